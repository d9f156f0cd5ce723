"""gateloop_jax: GateLoop (fully data-controlled linear recurrence) in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Ranges chosen to resolve on Python 3.11 (jax stops at 0.10.x there) and 3.12 (jax 0.11.x).
INSTALL_REQUIRES = [
    "jax>=0.6.0,<0.12",
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
]

EXTRAS_REQUIRE = {
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "nbclient>=0.10",
        "nbformat>=5.10",
        "ipykernel>=6.29",
    ],
    # Peer kernels for experiments/bench_modes.py. jax-linear-attention is optional: the benchmark reports it as
    # skipped when it is not importable (it is not on PyPI at the time of writing; install it from source).
    "bench": [
        "tabulate>=0.9",
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
