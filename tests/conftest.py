"""Test set-up: 8 fake CPU devices for the sharding tests, and the oracle on the import path.

XLA_FLAGS must be set before jax is first imported, hence at the top of conftest. x64 is never enabled globally:
the oracle (tests/reference.py) is NumPy float64.
"""

import os
import sys

# LLVM optimisation level 0: the tests use tiny shapes, where XLA's CPU compile time (not run time) dominates;
# this cuts compile time about 6x on 2 cores. Numerics are unchanged (no fast-math either way).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
