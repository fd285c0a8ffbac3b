"""Installable distribution `mmpt`: four packages plus the embedded YAML recipes, and the `pretrain` CLI."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mmpt",
    version="0.1.0",
    description="Distributed multimodal pretraining: CLIP + MAE + MLM on ZeRO-3 and tensor parallelism",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*", "data_pipelines", "data_pipelines.*",
                                    "parallel", "parallel.*", "launch", "launch.*"]) + ["pretrain.configs"],
    # configs/ stays a top-level folder in the repo; installed, it is importable data of `pretrain`.
    package_dir={"pretrain.configs": "configs"},
    package_data={"pretrain.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "webdataset>=0.2.90",
        "tensorboard>=2.14",
        "pillow>=10",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.15",
        "pyyaml>=6",
        "tqdm>=4.60",
        "braceexpand>=0.1.7",
        "scikit-learn>=1.3",  # `pretrain eval --linear-probe` (logistic regression), `bench quality` digits
        # `pretrain convert --to onnx` (torch's TorchScript-based exporter writes onnx protos; fp16 and int8
        # conversion are onnxruntime's own), `pretrain embed --backend onnx`, `bench infer`
        "onnx>=1.16",
        # 1.25 is the first whose transformers optimizer fuses every attention layer of our export; Python
        # 3.10 gets at most 1.23.2 from PyPI (one layer of the image tower left unfused: same outputs)
        "onnxruntime>=1.25; python_version >= '3.11'",
        "onnxruntime>=1.18; python_version < '3.11'",
        "matplotlib>=3.7",  # `pretrain eval --plot METRIC`: metric against training step as a PNG
        "opacus>=1.6",  # cross_site.dp_noise: epsilon from its RDP accountant (imported only then)
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        # dev: tests and benches, incl. the libraries exports are checked against
        # (`convert --to hf|open_clip`, `bench step --vs open_clip`) and torchft, the DiLoCo the outer loop
        # of `cross_site.*` is checked against (tests/e2e/test_cross_site_torchft.py)
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "pytest-xdist>=3.5", "ruff>=0.6", "transformers>=4.40",
                "open_clip_torch>=2.24", "torchao>=0.18", "torchft>=0.2"],
        # `train.fp8` (torchao's float8 training; fp8 tensor cores on H100/H200)
        "fp8": ["torchao>=0.18"],
        # `pretrain data import --from parquet`, `pretrain embed --sharded` (and their tests)
        "data": ["pyarrow>=14"],
        # `data.tokenizer=clip` (OpenAI CLIP's BPE merges ship in open_clip_torch) and `convert --arch`
        "clip": ["open_clip_torch>=2.24", "ftfy>=6"],
    },
    entry_points={"console_scripts": ["pretrain=pretrain.cli:entry"]},
)
