"""megatron_hybrid: 3D-parallel pretraining of Olmo-Hybrid-style GDN/attention models on megatron-core."""

from setuptools import find_packages, setup

# Exact versions live in constraints.txt (pip install -c constraints.txt ...); the ranges here
# only say what the code is written against.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.12",
    "megatron-core==0.19.2",
    "transformers>=5.24,<5.25",
    "sentencepiece>=0.2",
    "safetensors>=0.6",
    "psutil>=5.9",  # megatron-core's dist checkpointing imports it without declaring it
    "numpy>=1.26",
    "pyyaml>=6",
    "tqdm>=4.66",
    "tensorboard>=2.17",  # --tensorboard-dir (torch.utils.tensorboard)
]

EXTRAS = {
    "test": ["pytest>=8", "ruff>=0.6"],
    # plots of tools/expressivity.py and tools/scaling_ladder.py (tables need nothing extra)
    "science": ["matplotlib>=3.8"],
    # GPU extras: never installed into the CPU test environment. fla's Triton kernels cannot run on
    # CPU, and transformers would pick them up for its own GDN path if they were importable.
    "gpu": ["transformer-engine[pytorch]==2.20.2", "flash-linear-attention==0.6.0"],
}

setup(
    name="megatron_hybrid",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_hybrid", "megatron_hybrid.*"])
    + [
        "megatron_hybrid.kernels",
        "megatron_hybrid.kernels.gdn",
        "megatron_hybrid.kernels.gdn.chunk_kernels",
    ],
    # Our GPU kernels live in the top-level kernels/ folder but are imported as
    # megatron_hybrid.kernels (the layout users asked for).
    package_dir={"megatron_hybrid.kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": []},
)
