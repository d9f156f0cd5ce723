"""Small tile helpers shared by the Pallas kernels (Triton on GPU, Mosaic on TPU, interpret mode on CPU).

Everything here is plain jax.numpy / lax on in-kernel values, so it lowers on every Pallas backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

TWO_PI = 2.0 * math.pi


def wrap(x):
    """Phase to [-pi, pi): e^{i x} unchanged; keeps sums of many phases small, so cos / sin of them stay accurate."""
    return x - TWO_PI * jnp.floor(x * (1.0 / TWO_PI) + 0.5)


def iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def dot(a, b, precision):  # a @ b
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_nt(a, b, precision):  # a @ b.T
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def dot_tn(a, b, precision):  # a.T @ b
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def strict(c, lower):
    """The c x c mask m < n (lower: rows n, columns m) or n > m (upper: rows m, columns n)."""
    r, col = iota((c, c), 0), iota((c, c), 1)
    return (col < r) if lower else (col > r)


def put_row(tile, n, row):
    """tile with row n replaced by row ((1, d) or (d,)): Triton has no scatter, a select over the tile is cheap."""
    return jnp.where(iota(tile.shape, 0) == n, row, tile)


# ---------------------------------------------------------------------------------------------------------------------
# (b, t, h, d) refs, as the Triton kernels read them: rows of one (batch, head) are strided by h * d.
# ---------------------------------------------------------------------------------------------------------------------


def rows(ref, bi, hi, row0, count):
    """Rows [row0, row0 + count) of batch bi, head hi as a (count, d) float32 tile."""
    return ref[bi, pl.ds(row0, count), hi, :].astype(jnp.float32)


def row(ref, bi, hi, n):
    return ref[bi, pl.ds(n, 1), hi, :].astype(jnp.float32)


def walk_rows(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, body, init):
    """Walk the rows n of a block of c = kc.shape[0] rows with the exact pairwise decay w[m, :] = e^{G_n - G_m}
    (m < n, else 0) - the exact form of the block's causal triangle, for any gate in [0, 1].

    The decay is carried multiplicatively, w_n[m] = w_{n-1}[m] |a_n| (and w_n[n-1] = |a_n|): a product of the
    factors in (m, n], with no cancellation however small an earlier |a| was, and one exp per row rather than per
    (row, column). kc, ks = k cos(Phi), k sin(Phi) with Phi the block's prefix phase (any representative mod 2 pi:
    the walk's own running phase is wrapped every step). For each row n calls
    body(n, carry, w, qc_n, qs_n, cos_n, sin_n) with qc_n = q_n cos(Phi_n) etc. as (1, d) rows; returns the carry.
    (A static Python loop over the rows was 2.4x slower on the H200: register spills; perf_notes.md.)
    """
    c, d = kc.shape
    m_idx = iota((c, d), 0)

    def step(n, state):
        w, phi, carry = state
        a_n = jnp.exp(row(lr_ref, bi, hi, row0 + n))
        phi = wrap(phi + wrap(row(th_ref, bi, hi, row0 + n)))
        w = jnp.where(m_idx < n, jnp.where(m_idx == n - 1, 1.0, w) * a_n, 0.0)
        q_n = row(q_ref, bi, hi, row0 + n)
        cos_n, sin_n = jnp.cos(phi), jnp.sin(phi)
        carry = body(n, carry, w, q_n * cos_n, q_n * sin_n, cos_n, sin_n)
        return w, phi, carry

    state = (jnp.zeros((c, d), jnp.float32), jnp.zeros((1, d), jnp.float32), init)
    state = jax.lax.fori_loop(0, c, step, state)
    return state[2]


def pad_operands(q, k, v, log_r, theta, h0, t_pad, dk_pad, dv_pad, dtype=None):
    """The multi-head kernels' operands padded to (t_pad, dk_pad / dv_pad): [q, k, v, log_r, theta] (cast to `dtype`
    when given) and h0 as float32 (re, im) of shape (b, h, dk_pad, dv_pad), zeros when h0 is None. Zero padding is
    exact: padded channels carry no key, value or state, padded steps come after every real one."""
    t = q.shape[1]

    def pad(x, width):
        x = x if dtype is None else x.astype(dtype)
        if t_pad != t or width != x.shape[-1]:
            x = jnp.pad(x, ((0, 0), (0, t_pad - t), (0, 0), (0, width - x.shape[-1])))
        return x

    args = [pad(x, dk_pad) for x in (q, k)] + [pad(v, dv_pad)] + [pad(x, dk_pad) for x in (log_r, theta)]
    if h0 is None:
        h0re = h0im = jnp.zeros((q.shape[0], q.shape[2], dk_pad, dv_pad), jnp.float32)
    else:
        widths = ((0, 0), (0, 0), (0, dk_pad - h0.shape[-2]), (0, dv_pad - h0.shape[-1]))
        h0re = jnp.pad(jnp.real(h0).astype(jnp.float32), widths)
        h0im = jnp.pad(jnp.imag(h0).astype(jnp.float32), widths)
    return args, h0re, h0im


def unpad_outputs(y, f_re, f_im, t, dk, dv):
    """(y (b, t, h, dv), final state complex (b, h, dk, dv)) from the padded kernel outputs."""
    return y[:, :t, :, :dv], jax.lax.complex(f_re[:, :, :dk, :dv], f_im[:, :, :dk, :dv])
