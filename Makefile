# Two commands do all set-up on a fresh machine (see README):
#   make demo   - every benchmark end to end on the offline stand-ins (CPU, no network)
#   make test   - the test suite
# Both create .venv if missing and install the project into it first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= outputs/demo

.PHONY: demo test install clean-demo benchmark

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py requirements.txt
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	@echo '== 1/3 segmentation test on the synthetic stand-in (not ImageNet) =='
	$(PY) baselines/ViT/demo_segmentation.py --out-dir $(DEMO_DIR)
	@echo '== 2/3 perturbation test on the synthetic stand-in (not ImageNet) =='
	$(PY) baselines/ViT/demo_perturbation.py --data-dir $(DEMO_DIR)/data/val --output-dir $(DEMO_DIR)/perturbation --device cpu
	@echo '== 3/3 rationale test on synthetic reviews (not ERASER Movie Reviews) =='
	$(PY) BERT_rationale_benchmark/synthetic_reviews.py --out-dir $(DEMO_DIR)/eraser/data --train 200 --val 20 --test 100 --seed 0
	$(PY) BERT_rationale_benchmark/models/pipeline/bert_pipeline.py --data-dir $(DEMO_DIR)/eraser/data --output-dir $(DEMO_DIR)/eraser/run --model-params BERT_params/synthetic_minilm.json --all-methods --split test --device cpu
	$(PY) BERT_rationale_benchmark/metrics.py --data-dir $(DEMO_DIR)/eraser/data --split test --results-dir $(DEMO_DIR)/eraser/run
	@echo "demo done: tables and pictures under $(DEMO_DIR)/"

benchmark: $(STAMP)
	$(PY) benchmarks/explain_speed.py

clean-demo:
	rm -rf $(DEMO_DIR)
