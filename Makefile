# Two commands do all set-up on a fresh machine (see README):
#   make demo   - every benchmark end to end on the offline stand-ins (CPU, no network)
#   make test   - the test suite
#   make test-portable - the test suite under other floating-point paths (issue 20)
# Both create .venv if missing and install the project into it first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= outputs/demo

.PHONY: demo test test-portable install clean-demo benchmark

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py requirements.txt
	$(PY) -m pip install -e '.[test]'
	@# Quantus (a test oracle, issue 24) without its opencv-python: that wheel would share
	@# the cv2 folder with opencv-python-headless and needs libGL (see setup.py)
	$(PY) -m pip install --no-deps 'quantus==0.6.0'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

# The suite once per floating-point path other than this machine's default,
# to see that no comparison depends on one CPU's rounding: one thread; ATen's
# kernels without vector dispatch, then AVX2 ones; MKL's reproducible mode on
# its AVX2 code path with oneDNN capped at AVX2 (ignored where torch has no
# MKL / oneDNN).  PORTABLE_TESTS narrows it, e.g.
#   make test-portable PORTABLE_TESTS="tests/test_engine_reference.py tests/test_vit.py"
PORTABLE_TESTS ?= tests
CAPABILITY = $(PY) -c "import torch; print('   torch', torch.__version__, '| ATen CPU capability', torch.backends.cpu.get_cpu_capability(), '| threads', torch.get_num_threads(), '| MKL', torch.backends.mkl.is_available())"

test-portable: $(STAMP)
	@echo '== 1/4 one thread: OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 =='
	@OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(CAPABILITY)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest $(PORTABLE_TESTS) -q
	@echo '== 2/4 ATen kernels without vector dispatch: ATEN_CPU_CAPABILITY=default =='
	@ATEN_CPU_CAPABILITY=default $(CAPABILITY)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest $(PORTABLE_TESTS) -q
	@echo '== 3/4 ATen AVX2 kernels: ATEN_CPU_CAPABILITY=avx2 =='
	@ATEN_CPU_CAPABILITY=avx2 $(CAPABILITY)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest $(PORTABLE_TESTS) -q
	@echo '== 4/4 MKL reproducible mode, AVX2 paths: MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 =='
	@MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(CAPABILITY)
	MKL_CBWR=COMPATIBLE MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest $(PORTABLE_TESTS) -q
	@echo "test-portable: the suite passed under every floating-point path"

demo: $(STAMP)
	@echo '== 1/7 segmentation test on the synthetic stand-in (not ImageNet) =='
	$(PY) baselines/ViT/demo_segmentation.py --out-dir $(DEMO_DIR)
	@echo '== 2/7 perturbation test on the synthetic stand-in (not ImageNet) =='
	$(PY) baselines/ViT/demo_perturbation.py --data-dir $(DEMO_DIR)/data/val --output-dir $(DEMO_DIR)/perturbation --device cpu
	@echo '== 3/7 rationale test on synthetic reviews (not ERASER Movie Reviews) =='
	$(PY) BERT_rationale_benchmark/synthetic_reviews.py --out-dir $(DEMO_DIR)/eraser/data --train 200 --val 20 --test 100 --seed 0
	$(PY) BERT_rationale_benchmark/models/pipeline/bert_pipeline.py --data-dir $(DEMO_DIR)/eraser/data --output-dir $(DEMO_DIR)/eraser/run --model-params BERT_params/synthetic_minilm.json --all-methods --split test --device cpu
	$(PY) BERT_rationale_benchmark/metrics.py --data-dir $(DEMO_DIR)/eraser/data --split test --results-dir $(DEMO_DIR)/eraser/run
	$(PY) BERT_rationale_benchmark/metrics.py --data-dir $(DEMO_DIR)/eraser/data --split test --results $(DEMO_DIR)/eraser/run/transformer_attribution/identifier_results_10.json --score-file $(DEMO_DIR)/eraser/transformer_attribution_scores_10.json
	@echo '== 4/7 class specificity on synthetic two-object scenes (ours; not ImageNet) =='
	$(PY) data/scenes.py --out-dir $(DEMO_DIR)/scenes --split val --count 200 --seed 0 --min-objects 2 --max-objects 2 --distinct-classes --separated --formats coco --quiet
	$(PY) baselines/ViT/class_specificity.py --annotations $(DEMO_DIR)/scenes/annotations/instances_val.json --image-dir $(DEMO_DIR)/scenes/val --weights samples/synthetic_scenes_vit --output-dir $(DEMO_DIR)/class_specificity --device cpu --quiet
	@echo '== 5/7 VQA perturbation test on the scenes stand-in (not VQA v2) =='
	$(PY) baselines/LXMERT/vqa_perturbation.py --model-dir samples/synthetic_scenes_lxmert --scenes 40 --output-dir $(DEMO_DIR)/vqa_perturbation --batch-size 32 --device cpu
	@echo '== 6/7 masks from DETR explanations on the scenes stand-in (not COCO) =='
	$(PY) baselines/DETR/detr_mask_eval.py --model-dir samples/synthetic_scenes_detr --scenes 100 --output-dir $(DEMO_DIR)/detr_masks --threshold 0.3 --device cpu
	@echo '== 7/7 faithfulness: flipping, ROAD, randomisation, complexity on the stand-ins (not ImageNet / Movie Reviews) =='
	$(PY) baselines/faithfulness_eval.py --weights samples/synthetic_vit --synthetic 8 --batch-size 8 --steps 8 --road-limit 4 --road-fractions 0.1,0.3,0.5,0.7,0.9 --randomization-limit 4 --output-dir $(DEMO_DIR)/faithfulness/image --device cpu
	$(PY) baselines/faithfulness_eval.py --text-model $(DEMO_DIR)/eraser/run/classifier --eraser-dir $(DEMO_DIR)/eraser/data --split test --limit 8 --batch-size 8 --steps 5 --randomization-limit 2 --output-dir $(DEMO_DIR)/faithfulness/text --device cpu
	@echo "demo done: tables and pictures under $(DEMO_DIR)/"

benchmark: $(STAMP)
	$(PY) benchmarks/explain_speed.py

clean-demo:
	rm -rf $(DEMO_DIR)
