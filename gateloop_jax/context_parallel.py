"""Context parallelism in the layers: the mixers' sequence ops run split over the mesh axes of the logical LENGTH axis.

Active when a mesh and logical rules are set (the trainer does both) and the rules map "length" onto mesh axes of
total size n > 1 (config.mesh.sequence = n with the default rules); otherwise every function here is the plain op.
Each device then holds t / n contiguous positions of every row:
  - GateLoop: ops.context_parallel (each shard runs its mode locally; only the per-shard states and total
    transitions, b * h * d_qk * (d_v + 1) complex numbers per shard, are all-gathered);
  - softmax attention: each shard all-gathers K and V (2 * b * t * h * d_qk values) and attends with its queries
    under the causal mask offset by its position in the sequence.
Shape legend: b batch, t length, h heads, k d_qk, v d_v.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

from gateloop_jax import ops
from gateloop_jax.ops.context_parallel import check_divisible, gateloop_context_parallel
from gateloop_jax.sharding import BATCH, HEADS, LENGTH, _dividing_axes, logical_to_spec


def sequence_axes() -> tuple[tuple[str, ...] | None, int]:
    """(mesh axes splitting the length, their total size) under the active mesh and rules; (None, 1) when unsplit."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None, 1
    axes = logical_to_spec((LENGTH,), rules)[0]
    if axes is None:
        return None, 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in axes)
    return (axes, size) if size > 1 else (None, 1)


def _batch_and_head_axes(shape):
    """Mesh axes splitting batch and heads of a (b, t, h, ...) array (those that do not divide are left out)."""
    rules = core_spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = _dividing_axes(logical_to_spec((BATCH,), rules)[0], mesh, shape[0])
    head_axes = _dividing_axes(logical_to_spec((HEADS,), rules)[0], mesh, shape[2])
    return batch_axes, head_axes


def gateloop(q, k, v, a, *, mode="auto", chunk_size=None, return_state=False):
    """ops.gateloop, context-parallel when the length is split (see the module doc); same shapes and results.

    q, k: (b, t, h, k); v: (b, t, h, v); a: (b, t, h, k) complex or PolarTransition. Returns y (b, t, h, v), and
    with return_state the final state (b, h, k, v) complex64: the last shard's, the state a decode loop continues.
    """
    axes, _ = sequence_axes()
    if axes is None:
        return ops.gateloop(q, k, v, a, mode=mode, chunk_size=chunk_size, return_state=return_state)
    batch_axes, head_axes = _batch_and_head_axes(q.shape)
    return gateloop_context_parallel(q, k, v, a, mesh=jax.sharding.get_abstract_mesh(), sequence_axis=axes,
                                     batch_axes=batch_axes, head_axes=head_axes, mode=mode, chunk_size=chunk_size,
                                     return_state=return_state)


def causal_attention(q, k, v, *, implementation=None):
    """jax.nn.dot_product_attention(q, k, v, is_causal=True), context-parallel when the length is split.

    q, k: (b, t, h, k); v: (b, t, h, v) -> (b, t, h, v). Split: each shard all-gathers K and V (the whole sequence's,
    t * h * (k + v) values per row on every device: memory O(t), the simple form rather than a ring) and masks keys
    after its own queries' global positions. Exact, since a softmax row needs all its keys at once anyway.
    """
    axes, shards = sequence_axes()
    if axes is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    check_divisible(q.shape[1], shards, axes)
    batch_axes, head_axes = _batch_and_head_axes(q.shape)
    spec = PartitionSpec(batch_axes, axes, head_axes)

    def body(q, k, v):
        t_local = q.shape[1]
        k_all, v_all = jax.lax.all_gather((k, v), axes, axis=1, tiled=True)
        start = jax.lax.axis_index(axes) * t_local
        query_pos = start + jnp.arange(t_local)
        mask = query_pos[:, None] >= jnp.arange(k_all.shape[1])[None, :]  # (t_local, t)
        return jax.nn.dot_product_attention(q, k_all, v_all, mask=mask[None, None], implementation=implementation)

    return jax.shard_map(body, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec, spec, spec),
                         out_specs=spec)(q, k, v)
