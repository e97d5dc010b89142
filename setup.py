"""rft: reward finetuning of generative models in JAX/Flax."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.4.30",
    "flax>=0.10",
    "optax>=0.2.3",
    "orbax-checkpoint>=0.6",
    "chex>=0.1.87",
    "ml-collections>=0.1.1",
    "clu>=0.0.12",
    "numpy>=1.26",
    "pillow>=10",
    "absl-py>=2",
    "tensorboardX>=2.6",  # TF-free TensorBoard event files behind clu's MetricWriter
    "tqdm>=4.66",
    "safetensors>=0.4",  # HF checkpoints (rft.weights), read without torch
    "matplotlib>=3.8",  # rft.repro: learning curves of the paper tables
]

setup(
    name="rft",
    version="0.1.0",
    description="Reward finetuning of diffusion models and LMs in JAX/Flax",
    packages=find_packages(include=["rft", "rft.*"]),
    package_data={"rft": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3",
                 # numerical references for the HF / diffusers / OpenCLIP-format loaders
                 # (torch: the CPU build). open_clip_torch is installed with --no-deps by
                 # the test command: its torchvision dependency is a CUDA build on PyPI.
                 "torch==2.13.0", "transformers>=5", "safetensors>=0.4",
                 "diffusers>=0.40", "ftfy>=6",
                 # the Colab notebooks, executed top to bottom in smoke mode
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "tfds": ["tensorflow-datasets"],
    },
)
