"""gateloop_jax: GateLoop, the linear recurrence with fully data-controlled complex state transitions, in JAX."""

from flax import nnx

# Parameters carry logical-axis metadata, but we place them explicitly (the trainer derives NamedShardings from
# nnx.get_partition_spec under the config's rules). Flax's eager sharding would instead demand a mesh whenever a
# model is built, which breaks notebooks and single-device use.
nnx.use_eager_sharding(False)

from gateloop_jax import ops  # noqa: E402
from gateloop_jax.checkpoint_io import load  # noqa: E402
from gateloop_jax.decode import generate  # noqa: E402
from gateloop_jax.ops import gateloop, gateloop_step  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "gateloop", "gateloop_step", "generate", "load"]
