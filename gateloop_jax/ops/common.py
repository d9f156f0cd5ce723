"""Shared pieces of the GateLoop op: input validation, the polar form of the transition, small math helpers.

Shape legend used throughout ops/: b batch, t length, h heads, k d_qk, v d_v, c chunks, n/m positions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MODES = ("scan", "recurrent", "attention", "chunked")
# Kernels computing the same function: "pallas" runs our elementwise kernel for max-headed shapes (d_qk = d_v = 1)
# and our chunked kernel for multi-head shapes (Triton on GPU, interpret mode elsewhere); "gla_rotation" runs
# jax-linear-attention's real-gated GLA kernel through the rotation identity (Hopper and bf16 only;
# ops/gla_rotation.py); "mosaic_gpu" our multi-head Pallas Mosaic GPU kernels (Hopper, jax >= 0.11; GPU interpret
# mode elsewhere; ops/pallas_mosaic_gpu.py).
KERNEL_MODES = ("pallas", "gla_rotation", "mosaic_gpu")
# The modes that take a chunk_size (the others compute without chunks).
CHUNKED_MODES = ("chunked", "pallas")
# Modes that take segment_ids (state resets inside a row). "gla_rotation" cannot: jla's kernel has no reset, and
# faking one through its log-space decay would not be exact.
SEGMENT_MODES = MODES + ("pallas",)

# Below this magnitude a transition is treated as exactly forgetting: log|a| is floored here so that |a| = 0 gives a
# finite log (about -69) instead of -inf, which would turn masked products into NaNs in the backward pass.
MIN_MAGNITUDE = 1e-30

# log|a| the Pallas kernels are given at a segment start. Its exp, and the exp of every sum that contains it, is exactly
# 0 in float32 (a = 0: the reset, exactly), and it is finite, so their 0/1-matrix segment sums see no 0 * -inf. This is
# exact only because every exponent in those kernels is a direct sum over its own span, never a difference of prefix
# sums (which would cancel against it); the pure-JAX chunked form takes such differences and masks instead.
ZERO_LOG_MAGNITUDE = -1e30


class PolarTransition(NamedTuple):
    """The state transition a = exp(log_magnitude) * exp(i * phase), both real arrays of shape (b, t, h, k).

    Layers pass this instead of a complex `a`: log sigmoid(gamma) computed directly is exact for extreme gates,
    whereas sigmoid(gamma) underflows to 0 in float32 below gamma ~ -88 and its log is then lost.
    """

    log_magnitude: jax.Array
    phase: jax.Array


def safe_abs_angle(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|a| and arg(a) of a complex array with finite gradients at a = 0 (jnp.abs / jnp.angle give NaN there)."""
    re, im = jnp.real(a), jnp.imag(a)
    sq = re * re + im * im
    nonzero = sq > MIN_MAGNITUDE * MIN_MAGNITUDE
    # Double-where: the untaken branch must also be NaN-free, or its NaN cotangent leaks through the select.
    safe_sq = jnp.where(nonzero, sq, 1.0)
    magnitude = jnp.where(nonzero, jnp.sqrt(safe_sq), 0.0)
    safe_re = jnp.where(nonzero, re, 1.0)
    safe_im = jnp.where(nonzero, im, 0.0)
    phase = jnp.where(nonzero, jnp.arctan2(safe_im, safe_re), 0.0)
    return magnitude, phase


def to_polar(a: jax.Array | PolarTransition) -> PolarTransition:
    """Complex transition -> float32 (log|a|, arg a). A PolarTransition is only cast to float32."""
    if isinstance(a, PolarTransition):
        return PolarTransition(a.log_magnitude.astype(jnp.float32), a.phase.astype(jnp.float32))
    magnitude, phase = safe_abs_angle(a.astype(jnp.complex64))
    log_magnitude = jnp.log(jnp.maximum(magnitude, MIN_MAGNITUDE))
    return PolarTransition(log_magnitude, phase)


def polar_to_complex(log_magnitude: jax.Array, phase: jax.Array) -> jax.Array:
    """exp(log_magnitude + i phase) as complex64."""
    return jax.lax.complex(jnp.exp(log_magnitude) * jnp.cos(phase), jnp.exp(log_magnitude) * jnp.sin(phase))


def cmul(ar, ai, br, bi):
    """(ar + i ai)(br + i bi) on pairs of real arrays: the Pallas kernels carry complex numbers as (re, im)."""
    return ar * br - ai * bi, ar * bi + ai * br


def polar_pair(log_magnitude, phase):
    """e^{log_magnitude + i phase} as a (re, im) pair of real arrays (polar_to_complex for kernels)."""
    magnitude = jnp.exp(log_magnitude)
    return magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)


def wrap_phase(phase: jax.Array) -> jax.Array:
    """Phase mapped to [-pi, pi): e^{i phase} is unchanged, but sums of many phases stay small in magnitude.

    round() has zero derivative, so gradients pass through unchanged.
    """
    two_pi = 2.0 * jnp.pi
    return phase - two_pi * jnp.round(phase / two_pi)


def segsum(x: jax.Array) -> jax.Array:
    """Segment sums over the last axis: out[..., n, m] = sum_{j=m+1..n} x[..., j] for m <= n, -inf above.

    Each entry is summed directly over its own segment rather than as a difference of two prefix sums, so there is
    no cancellation when the prefix sums are large (gates near 0 make them large and negative).
    Shape (..., t) -> (..., t, t).
    """
    t = x.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((t, t), dtype=bool), k=-1)
    # xs[..., n, m] = x[..., n] where n > m: summing down the n axis accumulates x_{m+1..n}.
    xs = jnp.where(strictly_lower, x[..., :, None], 0.0)
    sums = jnp.cumsum(xs, axis=-2)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    return jnp.where(causal, sums, -jnp.inf)


def reverse_exclusive_cumsum(x: jax.Array, axis: int) -> jax.Array:
    """out[j] = sum_{i > j} x[i] along axis, summed directly (no total-minus-prefix cancellation)."""
    rev = jnp.flip(jnp.cumsum(jnp.flip(x, axis), axis=axis), axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)
    return jax.lax.slice_in_dim(jnp.pad(rev, pad), 1, x.shape[axis] + 1, axis=axis)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """(b, t) int segment ids -> (b, t) bool, True where a new segment starts: where the id differs from the previous
    position's. Position 0 never starts one (the initial state belongs to each row's first segment)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(change[:, :1]), change], axis=1)


def reset_gates(log_r: jax.Array, theta: jax.Array, reset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(b, t, h, k) log|a| and phase with a = 0 exactly where reset (b, t) is True, for the chunked Pallas kernels:
    log|a| = ZERO_LOG_MAGNITUDE there (see its comment: exact only where every exponent is a direct sum over its own
    span; their sub-blocks holding a start fail the tame test and take the exact row loop), phase 0. The selects also
    make the gradients there exactly 0, where the kernels' reverse sums would leave rounding noise."""
    start = reset[:, :, None, None]
    return jnp.where(start, ZERO_LOG_MAGNITUDE, log_r), jnp.where(start, 0.0, theta)


def is_elementwise(q: jax.Array, v: jax.Array) -> bool:
    """Max-headed GateLoop (d_qk = d_v = 1): the state is one complex number per channel."""
    return q.shape[-1] == 1 and v.shape[-1] == 1


def _shape_error(name: str, got, expected: str) -> ValueError:
    return ValueError(f"gateloop: argument '{name}' has shape {tuple(got)}, expected {expected}.")


def validate_inputs(q, k, v, a, initial_state, mode, chunk_size, segment_ids=None) -> None:
    """One clear ValueError naming the argument, the shape received and the shape expected; runs before any compute."""
    if mode != "auto" and mode not in MODES + KERNEL_MODES:
        raise ValueError(f"gateloop: unknown mode {mode!r}; expected one of {('auto',) + MODES + KERNEL_MODES}.")
    if q.ndim != 4:
        raise _shape_error("q", q.shape, "rank 4 (batch, length, heads, d_qk)")
    b, t, h, dk = q.shape
    if k.shape != q.shape:
        raise _shape_error("k", k.shape, f"{q.shape} (batch, length, heads, d_qk), the shape of q")
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise _shape_error("v", v.shape, f"({b}, {t}, {h}, d_v) (batch, length, heads, d_v) matching q")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            raise ValueError(f"gateloop: argument '{name}' must be real, got dtype {x.dtype}; only 'a' is complex.")
    if isinstance(a, PolarTransition):
        for field, x in zip(a._fields, a):
            if x.shape != q.shape:
                raise _shape_error(f"a.{field}", x.shape, f"{q.shape} (batch, length, heads, d_qk) like q")
    else:
        if not jnp.issubdtype(a.dtype, jnp.complexfloating):
            raise ValueError(
                f"gateloop: argument 'a' must be complex (dtype complex64), got dtype {a.dtype} with shape "
                f"{tuple(a.shape)}; for a real-only transition pass a.astype(jnp.complex64) or a PolarTransition "
                "with phase 0."
            )
        if a.shape != q.shape:
            raise _shape_error("a", a.shape, f"{q.shape} (batch, length, heads, d_qk) like q")
    if initial_state is not None:
        expected = (b, h, dk, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise _shape_error("initial_state", initial_state.shape, f"{expected} (batch, heads, d_qk, d_v)")
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (b, t):
            raise _shape_error("segment_ids", segment_ids.shape, f"{(b, t)} (batch, length) like q's first two axes")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(
                f"gateloop: argument 'segment_ids' must be an integer array (a new segment starts where the id "
                f"changes), got dtype {segment_ids.dtype}; pass segment_ids.astype(jnp.int32)."
            )
        if mode != "auto" and mode not in SEGMENT_MODES:
            raise ValueError(
                f"gateloop: segment_ids is not supported by mode={mode!r} (its kernel cannot reset the state exactly); "
                f"use one of {SEGMENT_MODES} or 'auto'."
            )
    if chunk_size is not None:
        if mode != "auto" and mode not in CHUNKED_MODES:
            raise ValueError(
                f"gateloop: chunk_size={chunk_size} only applies to mode='chunked', 'pallas' or 'auto', not {mode!r}."
            )
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"gateloop: chunk_size must be a positive int, got {chunk_size!r}.")
