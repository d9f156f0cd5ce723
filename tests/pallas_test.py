"""The Pallas kernels in interpret mode (CPU) against the float64 oracle: forward, final state, all gradients.

Shapes are tiny so the file runs in well under a minute; each case forces several kernel paths at once (time padding,
channel padding, several time segments and the carry between them, a carried initial state).
"""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from reference import gateloop_backward, gateloop_forward, max_rel_error

from gateloop_jax.ops import pallas_chunked as pc
from gateloop_jax.ops import pallas_elementwise as pe

# float32 accumulation over <= 64 steps: rounding grows ~ sqrt(t) * 6e-8 relative to the output scale, so 2e-5
# leaves two orders of margin while a wrong index or a missing carry gives errors of order 1.
F32_RTOL = 2e-5


def _inputs(rng, b, t, h, dk, dv, with_h0=True):
    """Random inputs; batch row i gets gate regime i % 4: moderate |a| in [0.3, 1], |a| ~ 1e-26..1e-13 (the state
    forgets everything each step), |a| within 1e-6 of 1 (nothing decays), and both extremes interleaved."""
    q = rng.standard_normal((b, t, h, dk)).astype(np.float32)
    k = rng.standard_normal((b, t, h, dk)).astype(np.float32)
    v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    shape = (t, h, dk)
    regimes = [
        lambda: np.log(rng.uniform(0.3, 1.0, shape)),
        lambda: rng.uniform(-60.0, -30.0, shape),
        lambda: -rng.uniform(0.0, 1e-6, shape),
        lambda: np.where(rng.uniform(size=shape) < 0.5, -50.0, -1e-6),
    ]
    log_r = np.stack([regimes[i % 4]() for i in range(b)])
    theta = rng.uniform(-3 * np.pi, 3 * np.pi, (b, t, h, dk))  # phases up to several pi
    h0 = None
    if with_h0:
        h0 = (rng.standard_normal((b, h, dk, dv)) + 1j * rng.standard_normal((b, h, dk, dv))).astype(np.complex64)
    dy = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    dfinal = (rng.standard_normal((b, h, dk, dv)) + 1j * rng.standard_normal((b, h, dk, dv))).astype(np.complex64)
    return q, k, v, log_r.astype(np.float32), theta.astype(np.float32), h0, dy, dfinal


def _check(fn, args, rtol):
    """Forward, final state and gradients of L = sum(y dy) + Re<dfinal, H_t> against the oracle."""
    q, k, v, log_r, theta, h0, dy, dfinal = args
    y_ref, states = gateloop_forward(q, k, v, log_r, theta, h0)
    final_ref = states[:, -1]

    y, final = jax.jit(fn)(q, k, v, log_r, theta, h0)
    assert np.all(np.isfinite(np.asarray(y)))
    assert max_rel_error(y, y_ref) < rtol
    final = np.asarray(final)
    assert max_rel_error(final.real, final_ref.real) < rtol
    assert max_rel_error(final.imag, final_ref.imag) < rtol

    ref = _oracle_grads_with_final(q, k, v, log_r, theta, h0, dy, dfinal)

    def loss(q, k, v, log_r, theta, h0):
        y, final = fn(q, k, v, log_r, theta, h0)
        return jnp.sum(y * dy) + jnp.sum(jnp.real(final) * dfinal.real + jnp.imag(final) * dfinal.imag)

    argnums = (0, 1, 2, 3, 4) + ((5,) if h0 is not None else ())
    grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, log_r, theta, h0)
    for name, g, r in zip(("dq", "dk", "dv", "dlog_r", "dtheta"), grads, ref):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
        assert max_rel_error(g, r) < rtol, (name, max_rel_error(g, r))
    if h0 is not None:
        # jax.grad of a real loss w.r.t. a complex input returns conj(dL/dRe + i dL/dIm).
        dh0 = np.conj(np.asarray(grads[5]))
        assert max_rel_error(dh0.real, ref[5].real) < rtol
        assert max_rel_error(dh0.imag, ref[5].imag) < rtol


def _oracle_grads_with_final(q, k, v, log_r, theta, h0, dy, dfinal):
    """gateloop_backward plus a cotangent G_T on the final state. The backward is linear in (dy, G_T), so the G_T
    part is added separately: the oracle's reverse recurrence started from g = G_T with dy = 0."""
    base = gateloop_backward(q, k, v, log_r, theta, h0, dy)
    if h0 is None:
        h0 = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), np.complex128)
    _, states = gateloop_forward(q, k, v, log_r, theta, h0)
    a = np.exp(np.asarray(log_r, np.float64) + 1j * np.asarray(theta, np.float64))
    t = q.shape[1]
    g = np.asarray(dfinal, np.complex128)
    dk_, dv_ = np.zeros(k.shape), np.zeros(v.shape)
    dlr, dth = np.zeros(log_r.shape), np.zeros(theta.shape)
    for n in reversed(range(t)):
        dk_[:, n] = np.einsum("bhkv,bhv->bhk", g.real, v[:, n])
        dv_[:, n] = np.einsum("bhkv,bhk->bhv", g.real, k[:, n])
        prev = states[:, n - 1] if n > 0 else h0
        g_a = np.sum(np.conj(prev) * g, axis=-1)
        dlr[:, n] = np.real(np.conj(g_a) * a[:, n])
        dth[:, n] = np.real(np.conj(g_a) * 1j * a[:, n])
        g = np.conj(a[:, n])[..., None] * g
    dq, dk0, dv0, dlr0, dth0, dh00 = base
    return dq, dk0 + dk_, dv0 + dv_, dlr0 + dlr, dth0 + dth, dh00 + g


# ------------------------------------------------------------------------------------------------ max-headed kernel

# segment_length=8, unroll=4: several segments (the (P, local) carry between programs) and two blocks per segment
# (the saved block states of the backward); block_channels=4 with h=6 pads channels.
EW_SMALL = pe.Config(block_channels=4, unroll=4, segment_length=8)


@pytest.mark.parametrize(
    "t,with_h0,config",
    [
        (1, True, EW_SMALL),
        (7, False, pe.Config()),  # the defaults, as dispatch would call it
        (37, True, pe.Config(block_channels=8, unroll=4)),  # one segment covers t: no first pass, no carry
        (64, True, EW_SMALL),
    ],
)
def test_elementwise_matches_oracle(t, with_h0, config):
    rng = np.random.default_rng(t)
    args = _inputs(rng, 4, t, 6, 1, 1, with_h0=with_h0)
    fn = lambda *a: pe.gateloop_pallas_elementwise(*a, interpret=True, config=config)  # noqa: E731
    _check(fn, args, F32_RTOL)


def test_elementwise_supported():
    assert pe.supported((2, 8, 4, 1), (2, 8, 4, 1), "gpu")
    assert not pe.supported((2, 8, 4, 2), (2, 8, 4, 1), "gpu")
    assert not pe.supported((2, 8, 4, 1), (2, 8, 4, 1), "tpu")


# ------------------------------------------------------------------------------------------------ multi-head kernel


@pytest.mark.parametrize(
    "t,dk,dv,chunk,with_h0",
    [
        (1, 4, 3, 32, True),  # a single step: one sub-block, mostly padding
        (37, 4, 3, 16, False),  # odd length: time padding; 3 chunks of one sub-block: the carry kernels
        (64, 5, 16, 32, True),  # 2 chunks of 2 sub-blocks: off-diagonal sub-blocks and the carry; d_qk padded
        (50, 16, 2, 48, True),  # chunk of 3 sub-blocks (not a power of two), 2 chunks, padded length
    ],
)
def test_multihead_matches_oracle(t, dk, dv, chunk, with_h0):
    """Batch rows cycle through the gate regimes of _inputs (|a| in [0.3, 1], ~1e-26..1e-13, within 1e-6 of 1, both
    extremes interleaved): y, the final state and all gradients, a final-state cotangent included."""
    rng = np.random.default_rng([t, dk, dv, chunk])
    args = _inputs(rng, 4, t, 2, dk, dv, with_h0=with_h0)
    fn = lambda *a: pc.gateloop_pallas_chunked(*a, chunk_size=chunk, interpret=True)  # noqa: E731
    _check(fn, args, F32_RTOL)


@pytest.mark.parametrize("t,carry_unroll", [(128, 4), (96, 4), (48, 8)])
def test_multihead_carry_unroll(t, carry_unroll):
    """Config.carry_unroll: the sequential carries take several chunks per loop iteration (loads ahead of stores),
    forward and reversed; 8 or 6 chunks of 16 with unroll 4 (a whole and a partial divisor: gcd 4 and 2), 3 with
    unroll 8 (gcd 1). With h0 and a final-state cotangent: both carries' ends are checked."""
    rng = np.random.default_rng([t, carry_unroll])
    args = _inputs(rng, 4, t, 2, 8, 5, with_h0=True)
    cfg = pc.Config(carry_unroll=carry_unroll)
    fn = lambda *a: pc.gateloop_pallas_chunked(*a, interpret=True, config=cfg)  # noqa: E731
    _check(fn, args, F32_RTOL)


@pytest.mark.parametrize("tame_nats", [0.0, 16.0, 32.0, 48.0, 64.0])
def test_multihead_diagonal_forms(tame_nats):
    """The two forms of the diagonal sub-blocks, each alone: tame_nats = 0 forces the exact row loop everywhere; with
    T > 0, gates of log|a| in [-T/16, -0.95 T/16] keep every sub-block within T nats, so every program takes the
    matrix-product form at its least accurate (factors up to e^T; 48 is the default, 64 shows its margin)."""
    rng = np.random.default_rng(7)
    q, k, v, log_r, theta, h0, dy, dfinal = _inputs(rng, 2, 40, 2, 8, 5)
    step = max(tame_nats, 16.0) / 16.0
    log_r = rng.uniform(-step, -0.95 * step, log_r.shape).astype(np.float32)
    cfg = pc.Config(tame_nats=tame_nats)
    fn = lambda *a: pc.gateloop_pallas_chunked(*a, interpret=True, config=cfg)  # noqa: E731
    _check(fn, (q, k, v, log_r, theta, h0, dy, dfinal), F32_RTOL)


def _kernel_case(kernel, rng, t_multihead=20):
    """Inputs and the interpret-mode kernel for the dtype tests: max-headed (6 channels, 33 steps) or multi-head."""
    if kernel == "elementwise":
        return _inputs(rng, 2, 33, 6, 1, 1), functools.partial(pe.gateloop_pallas_elementwise, interpret=True,
                                                                config=EW_SMALL)
    return _inputs(rng, 2, t_multihead, 2, 8, 5), functools.partial(pc.gateloop_pallas_chunked, interpret=True)


@pytest.mark.parametrize("kernel", ["elementwise", "multihead"])
def test_bf16_inputs(kernel):
    """bf16 q, k, v are upcast on load; the state stays float32, so the error is the inputs' rounding alone."""
    (q, k, v, log_r, theta, h0, _, _), fn = _kernel_case(kernel, np.random.default_rng(3))
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    y, _ = fn(qb, kb, vb, log_r, theta, h0)
    # Oracle on the rounded inputs: any remaining error is the kernel's own float32 arithmetic.
    y_ref, _ = gateloop_forward(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), log_r, theta, h0)
    assert max_rel_error(y, y_ref) < F32_RTOL


@pytest.mark.parametrize("kernel", ["elementwise", "multihead"])
def test_bf16_gradients(kernel):
    """bf16 inputs go into the kernels uncast and their gradients come out in bf16 (stored once, rounded at the
    store), equal to the oracle's gradients at the rounded inputs up to that rounding: relative 2^-9 of an element,
    so 2^-8 of the largest leaves margin for the float32 arithmetic. y is asked for in bf16 too (out_dtype, what
    ops.gateloop passes), so dy comes back in bf16 and the kernels upcast it on load."""
    (q, k, v, log_r, theta, _, dy, _), fn = _kernel_case(kernel, np.random.default_rng(5), t_multihead=40)
    inputs = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, log_r, theta)]
    dy = np.asarray(jnp.asarray(dy, jnp.bfloat16), np.float32)  # y's cotangent arrives in bf16: the oracle gets it so

    def loss(*xs):
        y, _ = fn(*xs, None, out_dtype=jnp.bfloat16)
        assert y.dtype == jnp.bfloat16
        return jnp.sum(y.astype(jnp.float32) * dy)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*inputs)
    rounded = [np.asarray(x, np.float32) for x in inputs]
    ref = gateloop_backward(*rounded, None, dy)
    for name, g, r in zip(("dq", "dk", "dv", "dlog_r", "dtheta"), grads, ref):
        assert g.dtype == jnp.bfloat16, name
        err = max_rel_error(np.asarray(g, np.float32), r)
        assert err < 2.0**-8, (name, err)


def test_multihead_supported():
    assert pc.supported((2, 8, 4, 64), (2, 8, 4, 64), "gpu")
    assert not pc.supported((2, 8, 4, 64), (2, 8, 4, 64), "tpu")
