"""mode="recurrent": the plain sequential loop with jax.lax.scan, and the O(1)-per-token decode step.

O(t) sequential steps; the carry is one state per head. Under autodiff lax.scan keeps every carry for the backward
pass, so training memory matches mode="scan"; its strength is decoding, where only the carry is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gateloop_jax.ops.common import polar_to_complex


def step(q_t, k_t, v_t, a_t, state):
    """One recurrence step. q_t, k_t: (b, h, k) f32; v_t: (b, h, v) f32; a_t: (b, h, k) c64; state: (b, h, k, v) c64.

    Returns (y_t (b, h, v) f32, new state).
    """
    if q_t.shape[-1] == 1 and v_t.shape[-1] == 1:
        state = a_t[..., :, None] * state + (k_t * v_t)[..., None]
        return q_t * jnp.real(state[..., 0]), state
    state = a_t[..., :, None] * state + (k_t[..., :, None] * v_t[..., None, :]).astype(jnp.complex64)
    y_t = jnp.einsum("bhk,bhkv->bhv", q_t, jnp.real(state))
    return y_t, state


def gateloop_recurrent(q, k, v, log_r, theta, h0, reset=None):
    """Same contract as ops.scan.gateloop_scan, computed one position at a time."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    a = polar_to_complex(log_r, theta)
    if reset is not None:  # a segment start: H_n = k_n^T v_n (a = 0 exactly)
        a = jnp.where(reset[:, :, None, None], 0.0, a)
    state = jnp.zeros((b, h, dk, dv), jnp.complex64) if h0 is None else h0

    def body(state, xs):
        y_t, state = step(*xs, state)
        return state, y_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, a)]
    state, ys = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(ys, 0, 1), state
