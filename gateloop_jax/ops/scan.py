"""mode="scan": parallel prefix over time with jax.lax.associative_scan.

The GateLoop operator on pairs (a, b = k^T v): (a_i, b_i) . (a_j, b_j) = (a_j a_i, a_j b_i + b_j). O(t) work, O(log t)
depth, but every state H_n is materialised: memory t * d_qk * d_v per head (t per channel when max-headed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gateloop_jax.ops.common import polar_to_complex


def _combine(left, right):
    a_left, b_left = left
    a_right, b_right = right
    return a_right * a_left, a_right * b_left + b_right


def scan_elementwise(x, a, h0):
    """h_n = a_n h_{n-1} + x_n over axis 1. x, a: (b, t, h) complex; h0: (b, h) complex or None. Returns all h."""
    if h0 is not None:
        # Folding the carried state into the first input keeps the scan itself unchanged.
        x = x.at[:, 0].add(a[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (a, x), axis=1)
    return h


def gateloop_scan(q, k, v, log_r, theta, h0, reset=None):
    """q, k, log_r, theta: (b, t, h, k) f32; v: (b, t, h, v) f32; h0: (b, h, k, v) c64 or None -> (y, H_t).

    reset: (b, t) bool or None, True where a segment starts: the state restarts there (a = 0, exactly: the scan
    multiplies complex numbers, so nothing earlier survives and no log-space sum sees it)."""
    a = polar_to_complex(log_r, theta)
    if reset is not None:
        a = jnp.where(reset[:, :, None, None], 0.0, a)
    if q.shape[-1] == 1 and v.shape[-1] == 1:
        # Max-headed: one complex number per channel, everything elementwise (no 1x1 matrix products).
        x = (k[..., 0] * v[..., 0]).astype(jnp.complex64)
        h = scan_elementwise(x, a[..., 0], None if h0 is None else h0[..., 0, 0])
        y = q[..., 0] * jnp.real(h)
        return y[..., None], h[:, -1, :, None, None]
    kv = (k[..., :, None] * v[..., None, :]).astype(jnp.complex64)  # (b, t, h, k, v)
    a = a[..., None]
    if h0 is not None:
        kv = kv.at[:, 0].add(a[:, 0] * h0)
    _, states = jax.lax.associative_scan(_combine, (jnp.broadcast_to(a, kv.shape), kv), axis=1)
    # q is real, so Re(q H) = q Re(H): one real contraction instead of a complex one.
    y = jnp.einsum("bthk,bthkv->bthv", q, jnp.real(states))
    return y, states[:, -1]
