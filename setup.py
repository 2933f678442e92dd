"""gnn3d: DeepSpeed trainer for multi-view cross-domain diffusion (Wonder3D-style).

Install (CPU): pip install -e ".[test]". GPU users install a CUDA build of torch 2.13.0 first (see README).
"""

from pathlib import Path

from setuptools import find_packages, setup

# torch is pinned exactly: on a machine without torch, a range that admits newer releases makes pip pull a
# multi-GB CUDA build. A CUDA build of the same version (2.13.0+cuXXX) satisfies this pin.
TORCH = "torch==2.13.0"

setup(
    name="gnn3d",
    version="0.1.0",
    description="DeepSpeed ZeRO-2 trainer for Wonder3D-style multi-view cross-domain diffusion models",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "modeling*", "datapipes*"]),
    install_requires=[
        TORCH,
        "deepspeed>=0.16,<0.20",  # ZeRO engine, launcher, checkpoints
        "diffusers>=0.32,<0.43",  # UNet/VAE building blocks, schedulers
        "transformers>=4.45,<6",  # CLIP image encoder
        "webdataset>=1.0,<2",  # tar-shard URL layer (files, pipe:, http) and sample naming
        "braceexpand>=0.1.7",  # shard brace patterns (shard-{000000..000099}.tar)
        "numpy>=1.26",
        "pillow>=10",
        "psutil>=5.9",  # network interfaces: the gloo interface towards MASTER_ADDR (multi-node)
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "wandb>=0.18",
        "tensorboard>=2.15",
    ],
    extras_require={
        "xformers": ["xformers==0.0.35"],  # CUDA only (built against torch 2.13); SDPA is used elsewhere
        "bench": ["matplotlib>=3.8"],  # benchmarks/: the scaling plot
        "test": ["pytest>=8", "ruff>=0.6", "hypothesis>=6.100", "matplotlib>=3.8"],
        "dev": ["pytest>=8", "ruff>=0.6", "hypothesis>=6.100"],
    },
)
