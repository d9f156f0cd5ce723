"""Logical axis names (defined once), default rules mapping them onto mesh axes, and activation constraints.

Parameters carry logical names through nnx.with_partitioning; the trainer maps them onto a Mesh with axes
("data", "fsdp", "tensor") using rules that are config data. Activations are constrained with `constrain`, which is a
no-op unless a mesh and logical rules are active (so models run unchanged in notebooks and tests).
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

# The only logical axis names used anywhere in the code base.
BATCH, LENGTH, EMBED, HEADS, QK, V, MLP, VOCAB, LAYERS = (
    "batch", "length", "embed", "heads", "qk", "v", "mlp", "vocab", "layers",
)
LOGICAL_AXES = (BATCH, LENGTH, EMBED, HEADS, QK, V, MLP, VOCAB, LAYERS)
MESH_AXES = ("data", "fsdp", "tensor")

# Data parallelism over batch (data x fsdp); FSDP shards parameters along embed; tensor parallelism splits heads,
# the MLP hidden dimension and the vocabulary. Parameters' "embed" is sharded over fsdp; activations never name
# "embed" (see `constrain` call sites), so the residual stream is only batch-sharded.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, None),
    (EMBED, "fsdp"),
    (HEADS, "tensor"),
    (QK, None),
    (V, None),
    (MLP, "tensor"),
    (VOCAB, "tensor"),
    (LAYERS, None),
)


def logical_to_spec(logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> PartitionSpec:
    """('batch', 'length', None) -> PartitionSpec(('data', 'fsdp'), None, None) under `rules`."""
    return PartitionSpec(*core_spmd.from_sharding_rules(tuple(logical_axes), tuple(rules)))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names when a mesh and rules are active; identity otherwise."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, rules))
