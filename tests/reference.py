"""Float64 NumPy oracle of GateLoop: the plain loop, forward and a hand-derived backward.

Shapes: q, k (b, t, h, k); v (b, t, h, v); log_r, theta (b, t, h, k) with a = exp(log_r + i theta);
h0 (b, h, k, v) complex; segment_ids (b, t) int or None. No JAX here, so nothing depends on jax_enable_x64.

Segments: where segment_ids[:, n] differs from segment_ids[:, n - 1] the state restarts, H_n = k_n^T v_n: the oracle
takes a_n = 0 exactly there (so log_r and theta at such a position have no effect and a zero gradient).
"""

import numpy as np


def segment_starts(segment_ids, shape):
    """(b, t) bool, True where a new segment starts (position 0 never: the initial state belongs to the first)."""
    b, t = shape[:2]
    starts = np.zeros((b, t), bool)
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return starts


def transitions(log_r, theta, segment_ids):
    """a = exp(log_r + i theta), exactly 0 at segment starts."""
    a = np.exp(np.asarray(log_r, np.float64) + 1j * np.asarray(theta, np.float64))
    return np.where(segment_starts(segment_ids, a.shape)[:, :, None, None], 0.0, a)


def gateloop_forward(q, k, v, log_r, theta, h0=None, segment_ids=None):
    """Returns (y (b, t, h, v) float64, all states (b, t, h, k, v) complex128)."""
    q, k, v, log_r, theta = (np.asarray(x, np.float64) for x in (q, k, v, log_r, theta))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    a = transitions(log_r, theta, segment_ids)
    state = np.zeros((b, h, dk, dv), np.complex128) if h0 is None else np.asarray(h0, np.complex128).copy()
    states = np.zeros((b, t, h, dk, dv), np.complex128)
    y = np.zeros((b, t, h, dv))
    for n in range(t):
        state = a[:, n, :, :, None] * state + k[:, n, :, :, None] * v[:, n, :, None, :]
        states[:, n] = state
        y[:, n] = np.einsum("bhk,bhkv->bhv", q[:, n], state.real)
    return y, states


def gateloop_backward(q, k, v, log_r, theta, h0, dy, segment_ids=None, dfinal=None):
    """Gradients of sum(dy * y) (+ Re<dfinal, H_t> given a final-state cotangent dfinal) w.r.t. (q, k, v, log_r,
    theta, h0 as d/dRe + i d/dIm).

    With G_n = dL/dRe H_n + i dL/dIm H_n: G_n = q_n^T dy_n + conj(a_{n+1}) G_{n+1}; for w = a z the cotangent of z is
    conj(a) G_w and that of a is sum_v conj(z) G_w; dL/dlog_r = Re(conj(G_a) a), dL/dtheta = Re(conj(G_a) i a).
    At a segment start a = 0: both are 0 there and nothing flows further back.
    """
    q, k, v, log_r, theta, dy = (np.asarray(x, np.float64) for x in (q, k, v, log_r, theta, dy))
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    a = transitions(log_r, theta, segment_ids)
    h0 = np.zeros((b, h, dk, dv), np.complex128) if h0 is None else np.asarray(h0, np.complex128)
    _, states = gateloop_forward(q, k, v, log_r, theta, h0, segment_ids)
    dq, dk_, dv_ = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dlog_r, dtheta = np.zeros_like(log_r), np.zeros_like(theta)
    g = np.zeros((b, h, dk, dv), np.complex128) if dfinal is None else np.asarray(dfinal, np.complex128).copy()
    for n in reversed(range(t)):
        g = g + q[:, n, :, :, None] * dy[:, n, :, None, :]
        dq[:, n] = np.einsum("bhkv,bhv->bhk", states[:, n].real, dy[:, n])
        dk_[:, n] = np.einsum("bhkv,bhv->bhk", g.real, v[:, n])
        dv_[:, n] = np.einsum("bhkv,bhk->bhv", g.real, k[:, n])
        prev = states[:, n - 1] if n > 0 else h0
        g_a = np.sum(np.conj(prev) * g, axis=-1)
        dlog_r[:, n] = np.real(np.conj(g_a) * a[:, n])
        dtheta[:, n] = np.real(np.conj(g_a) * 1j * a[:, n])
        g = np.conj(a[:, n])[..., None] * g
    return dq, dk_, dv_, dlog_r, dtheta, g


def max_rel_error(x, ref):
    """max |x - ref| / max |ref|: an error relative to the output's scale, robust to entries near zero."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(x - ref)) / (scale if scale > 0 else 1.0))
