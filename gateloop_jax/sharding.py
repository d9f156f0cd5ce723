"""Logical axis names (defined once), default rules mapping them onto mesh axes, and activation constraints.

Parameters carry logical names through nnx.with_partitioning; the trainer maps them onto a Mesh with axes
("data", "fsdp", "sequence", "tensor") using rules that are config data. Activations are constrained with
`constrain`, which is a no-op unless a mesh and logical rules are active (so models run unchanged in notebooks and
tests).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
from absl import logging
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

# The only logical axis names used anywhere in the code base.
BATCH, LENGTH, EMBED, HEADS, QK, V, MLP, VOCAB, LAYERS = (
    "batch", "length", "embed", "heads", "qk", "v", "mlp", "vocab", "layers",
)
LOGICAL_AXES = (BATCH, LENGTH, EMBED, HEADS, QK, V, MLP, VOCAB, LAYERS)
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# Data parallelism over batch (data x fsdp); FSDP shards parameters along embed; context parallelism splits the
# length into contiguous shards (gateloop_jax/context_parallel.py); tensor parallelism splits heads,
# the MLP hidden dimension and the vocabulary. Parameters' "embed" is sharded over fsdp; activations never name
# "embed" (see `constrain` call sites), so the residual stream is only batch-sharded.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, ("data", "fsdp")),
    (LENGTH, "sequence"),
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


def map_over_batch_and_heads(fn, *args, out_kinds: Sequence[str]):
    """fn(*args) run per shard with jax.shard_map when a mesh and logical rules are active; fn(*args) otherwise.

    For ops that are independent per (batch row, head) but opaque to XLA's partitioner, such as a pallas_call: XLA
    cannot split a custom call, so under a sharded jit it would gather the whole batch onto every device. Every input
    leaf is (batch, length, heads, ...) or, like segment_ids, (batch, length); each argument's first leaf decides its
    spec. out_kinds gives per output leaf "sequence" for (b, t, h, ...) or "state" for (b, h, ...). A mesh axis that
    does not divide the batch or head count is left out (that dimension is then replicated), never an error.
    """
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return fn(*args)
    first = jax.tree.leaves(args)[0]
    batch_axes = _dividing_axes(logical_to_spec((BATCH,), rules)[0], mesh, first.shape[0])
    head_axes = _dividing_axes(logical_to_spec((HEADS,), rules)[0], mesh, first.shape[2])
    in_spec = PartitionSpec(batch_axes, None, head_axes)
    in_specs = tuple(in_spec if jax.tree.leaves(arg)[0].ndim > 2 else PartitionSpec(batch_axes, None) for arg in args)
    by_kind = {"sequence": in_spec, "state": PartitionSpec(batch_axes, head_axes)}
    out_specs = tuple(by_kind[kind] for kind in out_kinds)
    out_specs = out_specs[0] if len(out_specs) == 1 else out_specs
    # check_vma=False: pallas_call has no replication rule; the specs above state the (trivial) per-shard semantics.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _dividing_axes(axes, mesh, size):
    """The mesh axes of a logical dimension (None, a name or a tuple), dropping from the end until they divide size."""
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes or None


def make_mesh(mesh_shape, devices=None) -> jax.sharding.Mesh:
    """A Mesh over MESH_AXES from sizes like {"data": -1, "sequence": 1}; -1 takes the remaining devices.

    Axes missing from `mesh_shape` have size 1. A mesh needing more devices than exist is an error naming the sizes
    and the device count. Explicit sizes whose product is smaller than the device count use the first devices (with
    a warning: idle devices are usually a mistake, but it is how a one-device reference run is made on a larger host).
    Axes are "Auto" (not explicit): XLA propagates shardings from the in/out shardings and `constrain` hints.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(mesh_shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis name(s) {unknown}; the axes are {MESH_AXES}.")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh: at most one axis may be -1 (the remaining devices), got {rest} in {shape}.")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}.")
    fixed = 1
    for size in sizes.values():
        fixed *= size if size != -1 else 1
    if fixed > len(devices) or (rest and len(devices) % fixed):
        raise ValueError(
            f"mesh: {sizes} needs {fixed} devices{' times the -1 axis' if rest else ''}, but there are "
            f"{len(devices)} ({devices[0].platform}); choose sizes whose product divides {len(devices)}.")
    if rest:
        sizes[rest[0]] = len(devices) // fixed
    elif fixed != len(devices):
        logging.warning("mesh: %s uses %d of the %d devices; set one axis to -1 to use them all.", sizes, fixed,
                        len(devices))
        devices = devices[:fixed]
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
