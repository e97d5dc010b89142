"""rft: reward finetuning of generative models in JAX/Flax."""
from setuptools import find_namespace_packages, find_packages, setup

# Floors: the JAX stack (jax, flax, optax, orbax-checkpoint, chex, ml-collections,
# etils)
# at the versions installed where the test suite runs (the only ones tested); these
# libraries change APIs between minor releases and an older one next to a newer jax is
# untested (flax 0.12.8 itself needs jax>=0.10.0, so the old jax>=0.4.30 floor admitted
# combinations pip cannot install). The rest: the floors that stack declares for them
# (numpy>=2.0 from jax 0.10, absl-py>=2.3.1 from chex 0.1.92) or, where it declares
# none, the oldest release known to work with numpy 2 (matplotlib 3.8.4: the first
# wheels built against numpy 2). tests/test_packaging.py checks both against the
# installed versions' own requirements.
CORE = [
    "jax>=0.10.0",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "ml-collections>=1.1.0",
    "numpy>=2.0",
    "pillow>=10",
    "absl-py>=2.3.1",
    "tensorboardX>=2.6",  # TF-free TensorBoard event files (rft.metrics)
    "tqdm>=4.66",
    "safetensors>=0.4",  # HF checkpoints (rft.weights), read without torch
    "matplotlib>=3.8.4",  # rft.repro: learning curves of the paper tables
    "etils[epath]>=1.15.0",  # rft.paths: local and gs:// workdirs (also what orbax uses)
    "huggingface_hub>=2.4.0",  # hub ids of models (rft.weights.io.resolve_model_dir)
]

# configs/ and launch/ stay at the repository root (README: --config=configs/prdp.py); a
# wheel carries them as the packages rft.configs and rft.launch (rft/configs/*.py,
# rft/launch/*), where rft.config.resolve finds a config by name from any directory and
# `python -m rft.launch.local` runs. The checkpoints under rft/assets/ are data of the
# namespace packages rft.assets and rft.assets.positions.
SHIPPED_DIRS = {"rft.configs": "configs", "rft.launch": "launch"}
ASSETS = find_namespace_packages(include=["rft.assets", "rft.assets.*"], exclude=["*.__pycache__"])

setup(
    name="rft",
    version="0.1.0",
    description="Reward finetuning of diffusion models and LMs in JAX/Flax",
    packages=find_packages(include=["rft", "rft.*"]) + ASSETS + list(SHIPPED_DIRS),
    package_dir=SHIPPED_DIRS,
    package_data={**{p: ["*"] for p in ASSETS}, "rft.launch": ["*.sh"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3",
                 # numerical references for the HF / diffusers / OpenCLIP-format loaders
                 # (torch: the CPU build). open_clip_torch is installed with --no-deps by
                 # the test command: its torchvision dependency is a CUDA build on PyPI.
                 "torch==2.13.0", "transformers>=5", "safetensors>=0.4",
                 # diffusers' load_lora_weights (the exported LoRA adapters)
                 "peft>=0.21",
                 "diffusers>=0.40", "ftfy>=6",
                 # the Colab notebooks, executed top to bottom in smoke mode
                 "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        "tfds": ["tensorflow-datasets"],
        # gs:// workdirs through etils.epath + fsspec (rft.paths); TensorFlow also works
        "gcs": ["gcsfs"],
        # hub datasets as prompt sets / LM problems (rft.data.hf_datasets)
        "datasets": ["datasets"],
    },
)
