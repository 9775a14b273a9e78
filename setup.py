from setuptools import find_packages, setup

setup(
    name="ldm",
    version="0.1.0",
    description="Latent diffusion toolkit: CompVis-compatible, CPU-first, offline",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A range, so that a user's own (CUDA) torch survives the install; these machines' set-up script
        # (scripts/setup_env.sh) installs the exact CPU build first.
        "torch>=2.4,<3",
        "pytorch-lightning>=2.2,<3",
        "omegaconf>=2.3",
        "pyyaml>=6",
        "transformers>=4.40",
        "torchmetrics>=1.3",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "tqdm>=4.60",
        "tensorboard>=2.14",
    ],
    extras_require={
        # The tests run the benchmarks' quick modes (plots with matplotlib), check the diffusers export
        # against diffusers itself, and run the digits example (scikit-learn ships the data and the judge).
        "test": ["pytest>=7", "matplotlib>=3.7", "diffusers==0.42.1", "scikit-learn>=1.3"],
        # Benchmarks draw their plots with matplotlib and time diffusers side by side; never needed to train
        # or sample. diffusers is pinned: the export's key and config mapping is tested against this version.
        "bench": ["matplotlib>=3.7", "diffusers==0.42.1"],
        # The small class-folder example (scripts/prepare_digits.py, bench/own_data_digits.py): scikit-learn's
        # digits ship inside its wheel, so nothing is downloaded; its SVC is the samples' judge.
        "digits": ["scikit-learn>=1.3"],
    },
)
