"""The GateLoop recurrence in pure jax.numpy (no Flax): one entry point, four interchangeable modes."""

from gateloop_jax.ops.common import CHUNKED_MODES, KERNEL_MODES, MODES, SEGMENT_MODES, PolarTransition
from gateloop_jax.ops.dispatch import gateloop, gateloop_step, resolve_mode

__all__ = ["CHUNKED_MODES", "KERNEL_MODES", "MODES", "SEGMENT_MODES", "PolarTransition", "gateloop", "gateloop_step",
           "resolve_mode"]
