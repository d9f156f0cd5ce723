"""gateloop_jax: GateLoop (fully data-controlled linear recurrence) in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Ranges chosen to resolve on Python 3.11 (jax stops at 0.10.x there) and 3.12 (jax 0.11.x). On 3.12 jax is pinned to
# the 0.11 line whose Pallas Mosaic GPU API (and GPU interpret mode) mode="mosaic_gpu" is written and tested against;
# that API changes between releases. On 3.11 the mode is unavailable (a clear error) and "auto" never picks it.
INSTALL_REQUIRES = [
    "jax>=0.6.0,<0.12; python_version < '3.12'",
    "jax>=0.11.2,<0.12; python_version >= '3.12'",
    "flax>=0.11.0,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "ml-collections>=1.0,<2",
    "absl-py>=2.1",
    "numpy>=1.26",
    "tensorflow-datasets>=4.9.8,<5",
    "array-record>=0.5",
    "sentencepiece>=0.2,<0.3",
    "grain>=0.2.10,<0.3",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
    # Exports (gateloop_jax/export.py): model.safetensors; bfloat16 tensors through ml_dtypes.
    "safetensors>=0.8,<1",
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
        # `make lint` (ruff.toml); pinned below 1.0 so that new default rules do not fail CI unannounced.
        "ruff>=0.6,<1",
    ],
    "bench": [
        "tabulate>=0.9",
    ],
    # EleutherAI's lm-evaluation-harness for gateloop_jax/lm_eval_adapter.py (pure Python, no PyTorch; part of
    # `make test`, whose adapter tests need it).
    "eval": [
        "lm-eval>=0.4.13,<0.5",
    ],
    # The peer kernels experiments/bench_modes.py times beside GateLoop's on a GPU (reported as skipped where not
    # importable): jax-linear-attention's Mosaic GPU GLA (Hopper, Python >= 3.12, pins jax 0.11.2) and fla's Triton
    # chunk_gla / chunk_hgrn (PyTorch). Not part of `make` (the pins and PyTorch are heavy): pip install -e ".[peers]".
    "peers": [
        "jax-linear-attention>=0.1.0; python_version >= '3.12'",
        "fla-core[cuda]>=0.6",
    ],
}

setup(
    name="gateloop_jax",
    version="0.1.0",
    description="GateLoop: fully data-controlled linear recurrence for sequence modeling, in JAX/Flax NNX.",
    packages=find_packages(include=["gateloop_jax", "gateloop_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
