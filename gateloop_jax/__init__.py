"""gateloop_jax: GateLoop, the linear recurrence with fully data-controlled complex state transitions, in JAX."""

from gateloop_jax import ops
from gateloop_jax.ops import gateloop, gateloop_step

__version__ = "0.1.0"
__all__ = ["ops", "gateloop", "gateloop_step"]
