"""Context parallelism: the GateLoop recurrence, exact, with its length split into contiguous shards over devices.

Shape legend: b batch, t length (per shard inside the shard function), h heads, k d_qk, v d_v, n shards.

Each shard, inside jax.shard_map over the mesh axis that splits the length:
  1. runs the op in its mode with a zero initial state: local output y, local final state F (b, h, k, v), and from
     the inclusive prefix sums of log|a| and arg a its total transition A = prod a (as sum log|a|, sum arg a: exact
     where the product itself would underflow);
  2. all-gathers the n pairs (A, F) - n * b * h * k * (2 + 2 v) floats in one buffer, the only communication - and
     folds the ones before it (and the carried state H_0) into its incoming state
     H_in = sum_{j<i} (prod_{j<l<i} A_l) F_j;
  3. adds the correction Re(q_n diag(prod_{m<=n} a_m) H_in) to y; its end state is F + A H_in.
Step 3 is one (t, k) x (k, v) product per head (elementwise when max-headed), where running the op a second time
with initial_state=H_in would redo its whole pass; the op's own pass needs no communication before it, and the mode
(any of ops.MODES or a kernel mode) is used as it is. Autodiff goes through shard_map (all_gather transposes to a
reduce-scatter of the (A, F) cotangents), so gradients are exact too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from gateloop_jax.ops import dispatch, scan
from gateloop_jax.ops.common import KERNEL_MODES, PolarTransition, to_polar, validate_inputs, wrap_phase


def _wrapped_add(x, y):
    return wrap_phase(x + y)


def _prefix_transition(polar: PolarTransition) -> tuple[jax.Array, jax.Array]:
    """Inclusive prefix sums over the length of log|a| and of arg a, the phase kept in [-pi, pi) at every step.

    Wrapping every partial sum keeps the phase's float32 error at a few eps * pi whatever the length; a plain cumsum
    of phases grows to ~t * pi, where float32 resolves only ~t * pi * 6e-8 rad (0.02 rad at 1e5 positions).
    """
    cum_r = jnp.cumsum(polar.log_magnitude, axis=1)
    cum_theta = jax.lax.associative_scan(_wrapped_add, wrap_phase(polar.phase), axis=1)
    return cum_r, cum_theta


def _incoming_state(total_r, total_theta, final, h0, axis_name):
    """The state entering this shard, from the all-gathered shard summaries.

    total_r, total_theta: (b, h, k); final: (b, h, k, v) complex64; h0: (b, h, k, v) complex64 or None.
    """
    # One buffer, one collective (and one reduce-scatter in the backward pass) instead of three.
    packed = jnp.concatenate([total_r[..., None], total_theta[..., None], jnp.real(final), jnp.imag(final)], axis=-1)
    gathered = jax.lax.all_gather(packed, axis_name)  # (n, b, h, k, 2 + 2 v)
    dv = final.shape[-1]
    gathered_r, gathered_theta = gathered[..., 0], gathered[..., 1]
    gathered_final = jax.lax.complex(gathered[..., 2:2 + dv], gathered[..., 2 + dv:])
    transition = jax.lax.complex(jnp.exp(gathered_r) * jnp.cos(gathered_theta),
                                 jnp.exp(gathered_r) * jnp.sin(gathered_theta))[..., None]  # (n, b, h, k, 1)
    # Inclusive scan over the shards of the same affine maps the op scans over positions: (A_j, F_j) composed.
    products, states = jax.lax.associative_scan(
        scan._combine, (jnp.broadcast_to(transition, gathered_final.shape), gathered_final), axis=0)
    if h0 is not None:
        states = states + products * h0
        first = h0[None]
    else:
        first = jnp.zeros_like(states[:1])
    # Exclusive: shard i starts from the end state of shard i - 1 (shard 0 from H_0).
    incoming = jnp.concatenate([first, states[:-1]], axis=0)
    return incoming[jax.lax.axis_index(axis_name)]


def gateloop_shard(q, k, v, a, *, axis_name, mode="auto", initial_state=None, chunk_size=None):
    """The context-parallel op on one shard; call inside jax.shard_map with the length split over `axis_name`.

    Args:
      q, k: (b, t, h, k) real, this shard's t = length / n positions; v: (b, t, h, v); a: (b, t, h, k) complex or a
        PolarTransition. axis_name: the mesh axis (or tuple of axes) splitting the length, shards in position order.
      mode, chunk_size: as in ops.gateloop, for the op each shard runs locally.
      initial_state: (b, h, k, v) complex, the state before the whole sequence (every shard passes the same one).

    Returns:
      (y (b, t, h, v) in the promoted dtype of q, k, v; this shard's end state (b, h, k, v) complex64). The last
      shard's end state is the final state of the whole sequence.
    """
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    polar = to_polar(a)
    zero_state = None
    if dispatch.resolve_mode(mode, q.shape, v.shape) in ("recurrent", "chunked"):
        # Their lax.scan needs its carry to vary over the same mesh axes as its inputs; the zero state they make
        # themselves varies over none, zeros_like of an input-derived (b, h, k, v) value over the same ones. Both
        # modes carry a state from zero anyway, so passing it costs nothing.
        zero_state = jnp.zeros_like(q[:, 0, :, :, None] * v[:, 0, :, None, :], dtype=jnp.complex64)
    y, final = dispatch.gateloop(q, k, v, polar, mode=mode, chunk_size=chunk_size, initial_state=zero_state,
                                 return_state=True)
    cum_r, cum_theta = _prefix_transition(polar)
    h0 = None if initial_state is None else initial_state.astype(jnp.complex64)
    h_in = _incoming_state(cum_r[:, -1], cum_theta[:, -1], final, h0, axis_name)

    # Re(q_n diag(e^{R_n + i Phi_n}) H_in) with R, Phi the inclusive prefix sums: R <= 0, so the factor is bounded.
    scale = q.astype(jnp.float32) * jnp.exp(cum_r)
    re, im = scale * jnp.cos(cum_theta), scale * jnp.sin(cum_theta)
    if q.shape[-1] == 1 and v.shape[-1] == 1:
        # Max-headed: one complex number per channel; 1 x 1 matrix products would be pure overhead.
        correction = re * jnp.real(h_in[..., 0])[:, None] - im * jnp.imag(h_in[..., 0])[:, None]
    else:
        # Full float32 products, as in mode "chunked": TF32 (the GPU default) would add ~1e-3 relative error.
        highest = jax.lax.Precision.HIGHEST
        correction = (jnp.einsum("bthk,bhkv->bthv", re, jnp.real(h_in), precision=highest)
                      - jnp.einsum("bthk,bhkv->bthv", im, jnp.imag(h_in), precision=highest))
    y = (y.astype(jnp.float32) + correction).astype(out_dtype)
    total = jax.lax.complex(jnp.exp(cum_r[:, -1]) * jnp.cos(cum_theta[:, -1]),
                            jnp.exp(cum_r[:, -1]) * jnp.sin(cum_theta[:, -1]))
    return y, final + total[..., None] * h_in


def check_divisible(length: int, shards: int, axis) -> None:
    """One clear error, before any compute, when the length cannot be split evenly over the sequence axis."""
    if length % shards:
        raise ValueError(
            f"context parallelism: the length {length} is not divisible by the sequence axis size {shards} (mesh axis "
            f"{axis!r}); use a length that is a multiple of {shards} (e.g. {-(-length // shards) * shards}) or a "
            "sequence axis size that divides it.")


def gateloop_context_parallel(q, k, v, a, *, mesh=None, sequence_axis="sequence", batch_axes=None, head_axes=None,
                              mode="auto", initial_state=None, return_state=False, chunk_size=None):
    """ops.gateloop with the length split over the mesh axis `sequence_axis` (jax.shard_map; see the module doc).

    Args:
      q, k: (b, t, h, k); v: (b, t, h, v); a: (b, t, h, k) complex or PolarTransition; initial_state: (b, h, k, v).
      mesh: the mesh (None: the one set with jax.set_mesh). sequence_axis: mesh axis name (or tuple) splitting t;
        t must be divisible by its size. batch_axes, head_axes: mesh axes splitting b and h (None: not split).
      mode, return_state, chunk_size: as in ops.gateloop.

    Returns:
      y (b, t, h, v), sharded like q; with return_state, (y, final state (b, h, k, v) complex64).
    """
    validate_inputs(q, k, v, a, initial_state, mode, chunk_size)
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    axes = (sequence_axis,) if isinstance(sequence_axis, str) else tuple(sequence_axis)
    shards = 1
    for axis in axes:
        shards *= mesh.shape[axis]
    check_divisible(q.shape[1], shards, sequence_axis)
    polar = to_polar(a)
    seq_spec = PartitionSpec(batch_axes, sequence_axis, head_axes)
    # Every shard needs H_0 in its fold; a copy per shard (a leading axis split over the shards) keeps every input
    # and output split over the sequence axis, so the gradients of replicated values need no special treatment.
    per_shard_spec = PartitionSpec(sequence_axis, batch_axes, head_axes)
    args = [q, k, v, polar]
    in_specs = [seq_spec, seq_spec, seq_spec, PolarTransition(seq_spec, seq_spec)]
    if initial_state is not None:
        args.append(jnp.broadcast_to(initial_state.astype(jnp.complex64)[None], (shards, *initial_state.shape)))
        in_specs.append(per_shard_spec)

    def body(q, k, v, a, h0=None):
        y, end = gateloop_shard(q, k, v, a, axis_name=sequence_axis, mode=mode, chunk_size=chunk_size,
                                initial_state=None if h0 is None else h0[0])
        return y, end[None]

    # A pallas_call has no replication rule, so kernel modes run unchecked; every input and output here is split
    # over the sequence axis, which keeps that exact (see per_shard_spec).
    check_vma = dispatch.resolve_mode(mode, q.shape, v.shape) not in KERNEL_MODES
    y, ends = jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=(seq_spec, per_shard_spec),
                            check_vma=check_vma)(*args)
    return (y, ends[-1]) if return_state else y
