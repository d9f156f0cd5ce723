"""Test set-up: 8 fake CPU devices for the sharding tests, and the oracle on the import path.

XLA_FLAGS must be set before jax is first imported, hence at the top of conftest. x64 is never enabled globally:
the oracle (tests/reference.py) is NumPy float64.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
