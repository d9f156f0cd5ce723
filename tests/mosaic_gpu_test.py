"""mode="mosaic_gpu" (ops/pallas_mosaic_gpu.py) in Mosaic GPU's GPU interpret mode on CPU against the float64 oracle:
y, final state and every gradient (forward and backward kernels), at every head width, extreme gates, odd lengths, a
carried state; the kernels' CUDA lowering (run on CPU: layouts, wgmma operand shapes, TMA boxes); the sharded layer
equal to the unsharded one.

Needs jax >= 0.11 (Pallas Mosaic GPU with InterpretGPUParams); on older jax only the "unavailable" error is tested.
Interpret mode costs a few seconds per (batch x head x width tile x 64-row chunk) program, so shapes are tiny.
"""

import functools
import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from reference import gateloop_forward, max_rel_error
from pallas_test import _oracle_grads_with_final

from gateloop_jax import ops
from gateloop_jax.ops import pallas_mosaic_gpu as pm

_KERNEL_DEV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "kernel_dev")

needs_mosaic = pytest.mark.skipif(pm.unavailable_reason() is not None, reason=str(pm.unavailable_reason()))

# The accuracy target (float32 inputs): relative error < 1e-4 for y, the final state and every gradient. The
# kernel's tensor-core operands are bf16 pairs (~16 bits, ~1e-5 relative, measured 0.5-2e-5 here); a wrong index,
# decay or carry gives errors of order 1.
RTOL = 1e-4


def _inputs(rng, b, t, h, dk, dv):
    """Batch row i gets gate regime i % 4 (the issue's extremes): |a| log-uniform in [1e-6, 1], |a| ~ 1e-6 (forgets
    every step), |a| within 1e-5 of 1 (nothing decays), and 1e-6 / 1 - 1e-6 interleaved; phases up to +-100 rad."""
    q, k = (rng.standard_normal((b, t, h, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    shape = (t, h, dk)
    regimes = [
        lambda: rng.uniform(np.log(1e-6), 0.0, shape),
        lambda: np.log(rng.uniform(1e-6, 2e-6, shape)),
        lambda: np.log1p(-rng.uniform(1e-6, 1e-5, shape)),
        lambda: np.where(rng.uniform(size=shape) < 0.5, np.log(1e-6), np.log1p(-1e-6)),
    ]
    log_r = np.stack([regimes[i % 4]() for i in range(b)]).astype(np.float32)
    theta = rng.uniform(-100.0, 100.0, (b, t, h, dk)).astype(np.float32)
    h0 = (rng.standard_normal((b, h, dk, dv)) + 1j * rng.standard_normal((b, h, dk, dv))).astype(np.complex64)
    dy = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    dfinal = (rng.standard_normal((b, h, dk, dv)) + 1j * rng.standard_normal((b, h, dk, dv))).astype(np.complex64)
    return q, k, v, log_r, theta, h0, dy, dfinal


def _check(args, variant=None):
    """One forward (vjp) through the public op (or the kernel variant given), then y, final state and all six
    gradients against the oracle."""
    q, k, v, log_r, theta, h0, dy, dfinal = args

    def fn(q, k, v, log_r, theta, h0):
        if variant is not None:
            return pm.gateloop_mosaic_gpu(q, k, v, log_r, theta, h0, variant=variant)
        a = ops.PolarTransition(log_r, theta)
        return ops.gateloop(q, k, v, a, mode="mosaic_gpu", initial_state=h0, return_state=True)

    (y, final), vjp = jax.vjp(jax.jit(fn), q, k, v, log_r, theta, h0)
    y_ref, states = gateloop_forward(q, k, v, log_r, theta, h0)
    # jax's cotangent for a complex output is conj(dL/dRe + i dL/dIm); the oracle's dfinal is dL/dRe + i dL/dIm.
    grads = vjp((jnp.asarray(dy), jnp.conj(jnp.asarray(dfinal))))
    ref = _oracle_grads_with_final(q, k, v, log_r, theta, h0, dy, dfinal)
    dh0 = np.conj(np.asarray(grads[5]))
    final = np.asarray(final)
    pairs = {"y": (y, y_ref), "final.re": (final.real, states[:, -1].real),
             "final.im": (final.imag, states[:, -1].imag)}
    pairs.update(zip(("dq", "dk", "dv", "dlog_r", "dtheta"), zip(grads, ref)))
    pairs.update({"dh0.re": (dh0.real, ref[5].real), "dh0.im": (dh0.imag, ref[5].imag)})
    # Per batch row, i.e. per gate regime: each output relative to its own scale in that regime (with |a| ~ 1e-6
    # the gate gradients are ~1e-6 of the others, and must still be accurate).
    errors = {(name, i): max_rel_error(np.asarray(x)[i], r[i]) for name, (x, r) in pairs.items() for i in range(len(q))}
    bad = {key: e for key, e in errors.items() if not (np.isfinite(e) and e < RTOL)}
    assert not bad, bad


# Every width in {32, 64, 96, 128, 256} on each side (d_qk and d_v pad to multiples of 64 and tile by 64: 96 and 256
# take several tiles, whose partial outputs are summed); t = 21 is odd and pads to one chunk.
@needs_mosaic
@pytest.mark.parametrize("dk,dv", [(32, 96), (96, 32), (64, 256), (256, 64), (128, 128)])
def test_every_width_matches_oracle(dk, dv):
    rng = np.random.default_rng(dk * 1000 + dv)
    # The interleaved extremes (regime 3: |a| = 1e-6 and 1 - 1e-6); the other regimes at one width below.
    args = _inputs(rng, 4, 21, 1, dk, dv)
    _check(tuple(x[3:] for x in args))


@needs_mosaic
@pytest.mark.parametrize("gate_factors", ["kernel", "xla"])
def test_extreme_gates_carried_state_several_chunks(gate_factors, monkeypatch):
    """All four gate regimes, t = 131: three chunks (the state carried between them), the last one padded; the gates'
    decay factors by either method (mosaic_gpu_gates.GATE_FACTORS)."""
    from gateloop_jax.ops import mosaic_gpu_gates

    monkeypatch.setattr(mosaic_gpu_gates, "GATE_FACTORS", gate_factors)
    _check(_inputs(np.random.default_rng(7), 4, 131, 1, 32, 32))


@needs_mosaic
@pytest.mark.parametrize("variant", ["padded_subblock", "padded_subblock_stream", "padded_subblock_direct",
                                     "padded_subblock_stream_rolled", "padded_subblock_stream_rolled_paired"])
def test_subblock_extreme_gates_carried_state(variant):
    """The "_subblock" variants (diagonals within 16-row sub-blocks, the other pairs as products of factored decays;
    "_stream": the fetches run ahead): all four gate regimes over three chunks, so every sub-block distance d = 1..3
    and the carried state count."""
    _check(_inputs(np.random.default_rng(7), 4, 131, 1, 32, 32), variant=variant)


@needs_mosaic
@pytest.mark.parametrize(
    "variant", ["padded_subblock", "padded_subblock_stream", "padded_stream", "padded_subblock_direct",
                "padded_subblock_stream_rolled"])
def test_mixed_widths_of_a_variant(variant):
    """Two d_qk tiles (their partial scores and gradients summed) and two d_v tiles (a streamed kernel's fetch list
    grows with them); t = 57 fills all four sub-blocks of its one chunk. Regime 0: |a| log-uniform, so the factored
    decays span every scale."""
    args = _inputs(np.random.default_rng(11), 1, 57, 1, 96, 128)
    _check(args, variant=variant)


@needs_mosaic
@pytest.mark.parametrize("variant", ["padded_stream", "padded_subblock_stream", "padded_subblock_direct",
                                     "padded_subblock_stream_rolled", "padded_subblock_stream_rolled_paired"])
def test_kernels_have_no_races(variant, monkeypatch):
    """The interpreter's happens-before race detector over each kernel of a variant, run alone (its verdict is per
    kernel): the forward and backward intra-chunk kernels with their fetches two ahead and their stores left in flight
    ("_stream"), and the state pass (two chunks of operands in flight), forward and reversed. Uninitialised shared
    memory reads as NaN. A missing wait or warpgroup barrier before a buffer is rewritten shows up here (both were
    tried)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    from gateloop_jax.ops.mosaic_gpu_common import plgpu
    from gateloop_jax.ops.mosaic_gpu_gates import gate_factors, gate_grad_sums

    monkeypatch.setattr(plgpu, "InterpretGPUParams", functools.partial(plgpu.InterpretGPUParams, detect_races=True))
    q, k, v, log_r, theta, _, dy, _ = _inputs(np.random.default_rng(3), 1, 2 * pm.CHUNK, 1, 64, 64)
    zeros = jnp.zeros((1, 1, 64, 64))
    q, k, v, lr, th, h0re, h0im = pm._padded(q, k, v, log_r, theta, zeros, zeros)
    t = jnp.full((1, 1, 2, 64), 0.5)
    opts = (True, variant)
    sub_factors = pm._gate_factors(lr, th, opts).sub
    kernels = {
        "gate factors": lambda: gate_factors(lr, th, sub=True, interpret=True, method="kernel"),
        "gate-gradient sums": lambda: gate_grad_sums(q, k, q, k, q, k, q, k, interpret=True, method="kernel"),
        "forward": lambda: pm._forward_intra(q, k, v, lr, th, sub_factors, opts=opts),
        "backward": lambda: pm._backward_intra(q, k, v, lr, th, jnp.asarray(dy), sub_factors, opts=opts),
        "state pass": lambda: pm._state_pass(q, k, k, q, v, t, t, h0re, h0im, opts=opts),
        "state pass, reversed": lambda: pm._state_pass(q, k, k, q, v, t, t, h0re, h0im, opts=opts, reverse=True,
                                                       save=True),
        "state pass, two segments": lambda: pm._state_pass(q, k, k, q, v, t, t, h0re, h0im, opts=opts, save=True,
                                                           segments=2),
    }
    races = {}
    for name, kernel in kernels.items():
        jax.block_until_ready(kernel())
        races[name] = gpu_callbacks.get_races().races_found
    assert not any(races.values()), races


def _state_pass_oracle(r, a, b, t, s0, reverse):
    """float64 loop of pallas_mosaic_gpu._state_pass's contract: per chunk j, in order or reversed, out = Re(R S) and
    the state entering, then S <- T_j S + A^T b."""
    bsz, tp, h, _ = a.shape
    n = tp // pm.CHUNK
    s = s0.astype(np.complex128)
    out = np.zeros((bsz, tp, h, b.shape[-1]))
    saved = np.zeros((bsz, h, n) + s0.shape[2:], np.complex128)
    for j in (reversed(range(n)) if reverse else range(n)):
        rows = slice(j * pm.CHUNK, (j + 1) * pm.CHUNK)
        out[:, rows] = np.einsum("bthk,bhkv->bthv", r[:, rows], s).real
        saved[:, :, j] = s
        s = t[:, :, j, :, None] * s + np.einsum("bthk,bthv->bhkv", a[:, rows], b[:, rows])
    return out, s, saved


@needs_mosaic
@pytest.mark.parametrize("variant,segments", [("padded", 1), ("padded", 2), ("padded", 4), ("padded_scan", None)])
@pytest.mark.parametrize("reverse", [False, True])
def test_state_pass_matches_its_loop(reverse, variant, segments):
    """The state pass between chunks alone (forward: y's inter-chunk part and the states; reversed: the backward's
    cotangent pass), as the serial kernel (its chain whole, or cut into segments of two chunks and of one, carried
    across by XLA) and as XLA's associative scan ("_scan"), against a float64 loop over four chunks, two d_qk and two
    d_v tiles, complex factors of magnitudes from e^{-30} to 1 (as the op forms them, every exponent <= 0).
    Tolerance: the bf16-pair products (~16 bits per operand) of the module docstring, relative to each output's
    scale."""
    seed = int(os.environ.get("GATELOOP_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    rng = np.random.default_rng(seed)
    bsz, tp, h, dk, dv = 2, 4 * pm.CHUNK, 2, 128, 128

    def real(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def factor(*shape):  # x e^{lr + i ph}
        return real(*shape) * np.exp(rng.uniform(-30.0, 0.0, shape) + 1j * rng.uniform(-np.pi, np.pi, shape))

    r, a, b = factor(bsz, tp, h, dk), factor(bsz, tp, h, dk), real(bsz, tp, h, dv)
    t = np.exp(rng.uniform(-3.0, 0.0, (bsz, h, 4, dk)) + 1j * rng.uniform(-100.0, 100.0, (bsz, h, 4, dk)))
    s0 = real(bsz, h, dk, dv) + 1j * real(bsz, h, dk, dv)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    res = pm._state_pass(f32(r.real), f32(r.imag), f32(a.real), f32(a.imag), b, f32(t.real), f32(t.imag),
                         f32(s0.real), f32(s0.imag), opts=(True, variant), reverse=reverse, save=True,
                         segments=segments)
    # The oracle on the float32-rounded inputs the op received.
    r, a, t = (f32(x.real) + 1j * f32(x.imag).astype(np.float64) for x in (r, a, t))
    out_ref, final_ref, saved_ref = _state_pass_oracle(r, a, b, t, s0, reverse)
    checks = {"out": (res[0], out_ref), "final.re": (res[1], final_ref.real), "final.im": (res[2], final_ref.imag),
              "saved.re": (res[3], saved_ref.real), "saved.im": (res[4], saved_ref.imag)}
    errors = {name: max_rel_error(np.asarray(x), ref) for name, (x, ref) in checks.items()}
    assert all(e < RTOL for e in errors.values()), (errors, f"GATELOOP_TEST_SEED={seed}")


def test_state_pass_operands_keep_their_low_halves():
    """The state pass's bf16 pairs, formed in XLA (mosaic_gpu_common._split_array): hi + lo = x to 2^-16 relative over
    every float32 scale, lo nonzero, and no float32 -> bf16 -> float32 round trip in the program, which XLA's GPU
    compiler may drop (it did on an H100: lo became zero, errors ~4e-3). The old split, x - f32(bf16(x)), fails the
    last check."""
    from gateloop_jax.ops.mosaic_gpu_common import _split_array

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-60.0, 60.0, 4096))).astype(np.float32)
    hi, lo = _split_array(jnp.asarray(x))
    assert hi.dtype == lo.dtype == jnp.bfloat16
    back = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    assert np.max(np.abs(back - x) / np.abs(x)) < 2.0**-16
    assert np.count_nonzero(np.asarray(lo, np.float32)) > 0.9 * x.size
    text = jax.jit(_split_array).lower(jnp.asarray(x)).as_text()
    assert not re.search(r"stablehlo.convert %\S+ : \(tensor<4096xbf16>\) -> tensor<4096xf32>", text), text


@pytest.mark.parametrize("method", ["matmul", "batched_matmul", "cumsum", "associative_scan"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("inclusive", [False, True])
def test_window_sums_match_the_loop(reverse, inclusive, method):
    """mosaic_gpu_common._window_sums (the within-chunk and within-sub-block sums as 0/1 matrix products) against a
    float64 loop, along a middle axis, on terms that span 1e-6..1e6 with both signs: each output is a direct sum of
    its own rows, so a sum formed as a total minus the rest (which cancels) or one that drops or repeats a row fails."""
    from gateloop_jax.ops.mosaic_gpu_common import _window_sums

    rng = np.random.default_rng(0)
    z = (rng.standard_normal((3, 64, 5)) * np.exp(rng.uniform(-14.0, 14.0, (3, 64, 5)))).astype(np.float32)
    out = _window_sums(jnp.asarray(z), 1, reverse=reverse, inclusive=inclusive, method=method)
    out = np.asarray(out, np.float64)
    ref = np.zeros_like(out)
    for c in range(64):
        rows = [s for s in range(64) if (s >= c if reverse else s <= c) and (inclusive or s != c)]
        ref[:, c] = z[:, rows].astype(np.float64).sum(axis=1)
    # float32 sums of up to 64 terms: <= 64 roundings of the largest partial sum, relative to the terms' magnitudes.
    scale = np.abs(z).astype(np.float64).sum(axis=1, keepdims=True)
    assert np.max(np.abs(out - ref) / scale) < 64 * 2.0**-24


def _gate_factor_oracle(lr, th):
    """float64 exponents of mosaic_gpu_gates' windows, each summed over its own rows of a chunk: {name: (R, P, bound)}
    with R = sum log|a|, P = sum arg a and bound the float32 error allowed on the factor e^{R + iP}."""
    b, t, h, k = lr.shape
    lr64 = lr.astype(np.float64).reshape(b, t // 64, 64, h, k)
    th64 = th.astype(np.float64).reshape(b, t // 64, 64, h, k)
    c, s = np.arange(64)[:, None], np.arange(64)[None, :]
    windows = {"p": s <= c, "f": s > c, "p_sub": (s <= c) & (s // 16 == c // 16)}
    windows.update({f"q{d}": (s > c) & (s // 16 <= c // 16 + d - 1) for d in (1, 2, 3)})
    out = {}
    for name, keep in windows.items():
        m = keep.astype(np.float64)
        r, p = (np.einsum("cs,bnshk->bnchk", m, z) for z in (lr64, th64))
        # float32 sums of up to 64 terms (<= 64 roundings of the terms' magnitudes), then exp / cos / sin (a few ulp).
        tol_r, tol_p = (64 * 2.0**-24 * np.einsum("cs,bnshk->bnchk", m, np.abs(z)) for z in (lr64, th64))
        bound = np.exp(r) * (tol_r + tol_p) + 8 * 2.0**-24
        out[name] = tuple(z.reshape(b, t, h, k) for z in (r, p, bound))
    return out


@pytest.mark.parametrize("method", ["kernel", "xla"])
def test_gate_factors_match_float64_window_sums(method):
    """mosaic_gpu_gates.gate_factors (the decay factors of every window: from the chunk start, to the chunk end, and
    the sub-block ones) against float64 sums of the same float32 gates, in all four gate regimes of _inputs (|a| from
    1e-6 to 1 - 1e-6, phases wrapped from +-100 rad). A window one row too long or short, a missing row or an exponent
    formed as a difference of prefix sums (which cancels at |a| ~ 1e-6) is off by far more than the bound. Q_2 and Q_3
    of rows whose window would reach past the chunk end are never used and not compared."""
    if method == "kernel" and pm.unavailable_reason() is not None:
        pytest.skip(str(pm.unavailable_reason()))
    from gateloop_jax.ops.mosaic_gpu_common import _wrap
    from gateloop_jax.ops.mosaic_gpu_gates import gate_factors

    _, _, _, log_r, theta, _, _, _ = _inputs(np.random.default_rng(5), 4, 128, 1, 64, 64)
    lr, th = jnp.asarray(log_r), _wrap(jnp.asarray(theta))
    g = gate_factors(lr, th, sub=True, interpret=True, method=method)
    oracle = _gate_factor_oracle(np.asarray(lr), np.asarray(th))
    row_sub_block = (np.arange(128) % 64 // 16)[None, :, None, None]
    got = {"p": g[0:2], "f": g[2:4], "p_sub": g.sub[0:2], "q1": g.sub[2:4], "q2": g.sub[4:6], "q3": g.sub[6:8]}
    for name, (real, imag) in got.items():
        r, p, bound = oracle[name]
        used = row_sub_block <= {"q2": 2, "q3": 1}.get(name, 3)
        err = np.abs(np.asarray(real) + 1j * np.asarray(imag) - np.exp(r + 1j * p))
        assert np.all(np.where(used, err <= bound, True)), (name, np.max(np.where(used, err / bound, 0)))
    tot = np.asarray(lr, np.float64).reshape(4, 2, 64, 1, 64).sum(2), np.asarray(th, np.float64).reshape(
        4, 2, 64, 1, 64).sum(2)
    want = np.transpose(np.exp(tot[0] + 1j * tot[1]), (0, 2, 1, 3))
    assert np.max(np.abs(np.asarray(g.t_re) + 1j * np.asarray(g.t_im) - want)) < 1e-5


def test_gate_factor_kernel_is_exact_on_empty_windows(monkeypatch):
    """An empty window (F at a chunk's last row, Q_1 at a sub-block's last row) carries a whole k^T v term undecayed,
    so its factor must be exactly 1 + 0i: with |a| ~ 1e-6 the end state's imaginary part is itself ~1e-6 and an
    approximate sin(0) would be a relative error of ~0.2 there. Checked with the special-function units' documented
    error (experiments/kernel_dev/approx_math_model.py) put into the kernel's e^{.}, cos and sin: every empty window
    exact, every other factor within the model's error (so the error really is in place)."""
    if pm.unavailable_reason() is not None:
        pytest.skip(str(pm.unavailable_reason()))
    monkeypatch.syspath_prepend(_KERNEL_DEV)
    import approx_math_model
    from gateloop_jax.ops import mosaic_gpu_gates
    from gateloop_jax.ops.mosaic_gpu_common import _wrap

    monkeypatch.setattr(mosaic_gpu_gates, "_polar", approx_math_model.polar_with_unit_errors)
    _, _, _, log_r, theta, _, _, _ = _inputs(np.random.default_rng(6), 2, 64, 1, 64, 64)
    lr, th = jnp.asarray(log_r), _wrap(jnp.asarray(theta))
    g = mosaic_gpu_gates.gate_factors(lr, th, sub=True, interpret=True, method="kernel")
    last_row, last_of_sub_block = np.arange(64) == 63, np.arange(64) % 16 == 15
    for (real, imag), empty in ((g[2:4], last_row), (g.sub[2:4], last_of_sub_block)):
        real, imag = np.asarray(real), np.asarray(imag)
        np.testing.assert_array_equal(real[:, empty], 1.0)
        np.testing.assert_array_equal(imag[:, empty], 0.0)
    r, p, _ = _gate_factor_oracle(np.asarray(lr), np.asarray(th))["p"]
    p_err = np.abs(np.asarray(g.p_re) + 1j * np.asarray(g.p_im) - np.exp(r + 1j * p))
    assert 0 < np.max(p_err) < 1e-5


@pytest.mark.parametrize("method", ["kernel", "xla"])
def test_gate_grad_sums_match_float64(method):
    """mosaic_gpu_gates.gate_grad_sums (the backward's per-row sums of the gate gradients' terms: from the row to the
    chunk end for the query side, before the row for the key side) against float64 sums of the same float32 inputs,
    which span 1e-6 to 1e3 in magnitude with both signs, over two chunks. Each output is a direct float32 sum over its
    own rows (the kernel splits each term exactly into three bf16 parts), so the error is the float32 rounding of the
    terms and of at most 64 additions: 3 * 64 roundings of the absolute terms' sum bound it. A window one row too long
    or short is off by about one term, far above the bound."""
    if method == "kernel" and pm.unavailable_reason() is not None:
        pytest.skip(str(pm.unavailable_reason()))
    from gateloop_jax.ops.mosaic_gpu_gates import gate_grad_sums

    rng = np.random.default_rng(13)
    shape = (2, 128, 1, 64)
    arrays = [(rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 3, shape)).astype(np.float32) for _ in range(8)]
    got = gate_grad_sums(*(jnp.asarray(x) for x in arrays), interpret=True, method=method)
    q, k, dq, dk_in, dk_f, xim, yim_in, yim_f = (x.astype(np.float64).reshape(2, 2, 64, 1, 64) for x in arrays)
    rows = np.arange(64)
    from_row = (rows[None, :] >= rows[:, None]).astype(np.float64)  # [c, s]: s >= c
    before_row = (rows[None, :] < rows[:, None]).astype(np.float64)  # s < c

    def window(m, z):
        return np.einsum("cs,bnshk->bnchk", m, z)

    terms = {"dlog_r": (q * dq - k * dk_in, k * dk_f), "dtheta": (k * yim_in - q * xim, -k * yim_f)}
    for (name, (after, before)), out in zip(terms.items(), got):
        want = window(from_row, after) + window(before_row, before)
        bound = 3 * 64 * 2.0**-24 * (window(from_row, np.abs(after)) + window(before_row, np.abs(before)))
        err = np.abs(np.asarray(out, np.float64).reshape(want.shape) - want)
        assert np.all(err <= bound), (name, np.max(err / bound))


@needs_mosaic
def test_op_with_gate_grad_sums_by_each_method(monkeypatch):
    """The op (y, final state, every gradient) against the float64 oracle with the gate-gradient sums by XLA (the
    kernel is the default, which the other op tests cover): all four gate regimes, three chunks, a carried state; and
    with the default, the kernel is in what the op lowers to for CUDA."""
    from gateloop_jax.ops import mosaic_gpu_gates

    assert mosaic_gpu_gates.GATE_GRAD_SUMS == "kernel"
    monkeypatch.setattr(mosaic_gpu_gates, "GATE_GRAD_SUMS", "xla")
    _check(_inputs(np.random.default_rng(17), 4, 131, 1, 32, 32))
    monkeypatch.setattr(mosaic_gpu_gates, "GATE_GRAD_SUMS", "kernel")
    q = jnp.zeros((1, 64, 1, 32), jnp.float32)

    def grads(q, lr):
        return jax.grad(lambda q, lr: jnp.sum(pm.gateloop_mosaic_gpu(q, q, q, lr, lr, None, interpret=False)[0]),
                        argnums=(0, 1))(q, lr)

    text = jax.jit(grads).trace(q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "gateloop_gate_grad_sums" in text


def test_segment_count_cuts_the_chain_where_sms_sit_idle():
    """The state pass's segments (mosaic_gpu_state_pass._segment_count): none where the chains fill the SMs (a
    training batch) or the length has no divisor giving segments of MIN_SEGMENT chunks; at the benchmark shape (4 x
    8 heads, 128 chunks, 132 SMs) four segments of 32, 76 steps instead of 128; at batch 1 and 512 chunks, 16."""
    from gateloop_jax.ops import mosaic_gpu_state_pass as sp

    assert sp._segment_count(32, 16 * 8 * 4, 132) == 1
    assert sp._segment_count(127, 8, 132) == 1
    assert sp._segment_count(16, 32, 132) == 1
    assert sp._segment_count(128, 32, 132) == 4
    assert sp._segment_count(512, 8, 132) == 16
    for n, programs in [(64, 1), (96, 8), (1024, 64), (4096, 2)]:
        s = sp._segment_count(n, programs, 132)
        assert n % s == 0 and (s == 1 or n // s >= sp.MIN_SEGMENT)


@needs_mosaic
def test_segmented_state_pass_through_the_op(monkeypatch):
    """The whole op (y, final state, every gradient) with every state pass cut into segments of one chunk: the
    forward, the backward's rebuild of the chunk-start states and its reversed cotangent pass each carry the state
    across segment ends in XLA. Extreme gates, a carried state, three chunks."""
    from gateloop_jax.ops import mosaic_gpu_state_pass as sp

    monkeypatch.setattr(sp, "_default_segments", lambda n_chunks, programs, interpret: n_chunks)
    _check(_inputs(np.random.default_rng(11), 4, 3 * pm.CHUNK - 5, 1, 32, 32), variant="padded")


@needs_mosaic
def test_bf16_inputs():
    """bf16 q, k, v: used in float32 (upcast), y returned in bf16 (its rounding, 2^-8, sets the tolerance)."""
    q, k, v, log_r, theta, h0, _, _ = _inputs(np.random.default_rng(3), 2, 9, 1, 32, 32)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    y = ops.gateloop(qb, kb, vb, ops.PolarTransition(log_r, theta), mode="mosaic_gpu", initial_state=h0)
    assert y.dtype == jnp.bfloat16
    y_ref, _ = gateloop_forward(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), log_r, theta, h0)
    assert max_rel_error(np.asarray(y, np.float32), y_ref) < 1e-2


@needs_mosaic
@pytest.mark.parametrize("dk,dv", [(32, 32), (96, 256), (256, 96), (128, 64)])
def test_lowers_for_cuda(dk, dv):
    """The real (non-interpret) kernel lowers to Mosaic GPU for CUDA on this CPU machine: layouts, wgmma operands
    and TMA boxes are checked at lowering; compiling and running it needs a Hopper GPU (experiments/)."""
    q = jnp.zeros((2, 80, 3, dk), jnp.bfloat16)
    v = jnp.zeros((2, 80, 3, dv), jnp.bfloat16)
    a = ops.PolarTransition(jnp.zeros(q.shape), jnp.zeros(q.shape))

    def fwd_bwd(q, k, v, a):
        def loss(q, k, v, a):
            y = pm.gateloop_mosaic_gpu(q, k, v, a.log_magnitude, a.phase, None, interpret=False)[0]
            return jnp.sum(y), y

        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, a)

    text = jax.jit(fwd_bwd).trace(q, q, v, a).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2, "the forward and backward kernels' custom calls are missing"


@needs_mosaic
@pytest.mark.parametrize("variant", [v for v in pm.VARIANTS if v != pm.VARIANT])
def test_variants_lower_for_cuda(variant):
    """The other kernel variants (pad-buffer layouts, exact math) still lower for CUDA: experiments/kernel_dev/
    check_mosaic_gpu.py compares them on the GPU in one call."""
    q = jnp.zeros((1, 64, 1, 32), jnp.float32)

    def fwd_bwd(q, lr):
        return jax.grad(lambda q, lr: jnp.sum(pm.gateloop_mosaic_gpu(q, q, q, lr, lr, None, interpret=False,
                                                                     variant=variant)[0]), argnums=(0, 1))(q, lr)

    text = jax.jit(fwd_bwd).trace(q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2, "the forward and backward kernels' custom calls are missing"


@needs_mosaic
def test_sharded_mixer_matches_one_device(monkeypatch):
    """The layer under a (data 2, tensor 2) mesh runs the kernels per (batch, head) shard through shard_map: the same
    output, loss and gradients as on one device."""
    from flax import nnx
    from jax._src.pallas.mosaic_gpu.interpret import shared_memory

    from gateloop_jax import layers
    from gateloop_jax.models import preset_config
    from gateloop_jax.sharding import DEFAULT_RULES, make_mesh

    # Mosaic GPU's interpreter (jax 0.11.2) ends each kernel with a consistency check over the barriers of every fake
    # device while the other devices may still be running theirs ("Barrier remains allocated" for another device's
    # live barrier): a race of the interpreter's own bookkeeping across devices, not of the kernel. Skip that check.
    monkeypatch.setattr(shared_memory.GPUSharedMemory, "assert_no_barriers_allocated", lambda self: None)
    config = preset_config("test", name="gateloop", d_model=16, num_heads=2, d_qk=8, d_v=8)
    x = jax.random.normal(jax.random.key(0), (2, 9, 16))
    mixer = layers.GateLoopMixer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mixer, nnx.Param)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, mode="mosaic_gpu")
        return jnp.sum(jnp.sin(y)), y

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (loss_1, y), grads = run(params, x)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        (loss_s, y_s), grads_s = run(params, x)
    # Per shard the kernels see the same rows and heads: y equal to rounding; parameter gradients sum over the batch
    # in another order (float32 sums of ~100 terms: ~1e-6 of each gradient's scale).
    np.testing.assert_allclose(y_s, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_s, loss_1, rtol=1e-5)
    for g, g_s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(g_s, g, rtol=0, atol=2e-5 * float(np.max(np.abs(g))))


def test_auto_and_unavailable():
    """"auto" never picks the kernel off a Hopper GPU; where jax lacks Mosaic GPU the mode is one clear error."""
    assert ops.resolve_mode("auto", (1, 8, 2, 64), (1, 8, 2, 64), platform="cpu") == "chunked"
    if pm.unavailable_reason() is None:
        return
    q = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="mosaic_gpu.*jax >= 0.11"):
        ops.gateloop(q, q, q, ops.PolarTransition(q, q), mode="mosaic_gpu")


@needs_mosaic
def test_bench_modes_times_a_kernel_variant_by_name():
    """experiments/bench_modes.py's "mosaic_gpu:VARIANT" (op scope) runs that variant of the kernel: the same y as
    the oracle at float32 level (bf16-pair operands: see RTOL), and an unknown variant is refused by name."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import bench_modes_work

    q, k, v, log_r, theta, _, _, _ = _inputs(np.random.default_rng(5), 1, 64, 1, 32, 32)
    forward, names = bench_modes_work.op_fn("mosaic_gpu:padded_subblock", "fwd", None)
    assert names == ("q", "k", "v", "log_magnitude", "phase")
    y = np.asarray(forward(q, k, v, log_r, theta))
    y_ref, _ = gateloop_forward(q, k, v, log_r, theta)
    assert max_rel_error(y, y_ref) < RTOL
    forward, _ = bench_modes_work.op_fn("mosaic_gpu:no_such_variant", "fwd", None)
    with pytest.raises(ValueError, match="no_such_variant"):
        forward(q, k, v, log_r, theta)


@needs_mosaic
def test_trace_script_runs_at_its_smoke_size(tmp_path):
    """experiments/kernel_dev/trace_mosaic_gpu.py (device time per kernel on the GPU) runs end to end in interpret
    mode and writes its record; on CPU the trace has no device plane, so no kernel is listed."""
    import json
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import trace_mosaic_gpu

    from gateloop_jax.ops import mosaic_gpu_common, mosaic_gpu_gates

    def settings():
        return mosaic_gpu_common.WINDOW_SUMS, mosaic_gpu_gates.GATE_FACTORS, mosaic_gpu_gates.GATE_GRAD_SUMS

    defaults = settings()
    methods = ("batched_matmul", *(next(m for m in choices if m != default) for choices, default in zip(
        (mosaic_gpu_gates.GATE_FACTOR_METHODS, mosaic_gpu_gates.GATE_GRAD_SUM_METHODS), defaults[1:])))
    trace_mosaic_gpu.main(["--smoke", "--variants", "padded", "--out", str(tmp_path), "--json", "t.json",
                           "--window_sums", methods[0], "--gate_factors", methods[1], "--gate_grad_sums", methods[2]])
    result = json.loads((tmp_path / "t.json").read_text())
    (record,) = result["records"]
    assert "error" not in record, record
    assert record["kernels_ms"] == [] and record["total_ms"] == 0.0
    assert (result["window_sums"], result["gate_factors"], result["gate_grad_sums"]) == methods
    # The methods are module settings: the script hands the defaults back to the rest of this process.
    assert settings() == defaults


@needs_mosaic
def test_backward_kernel_bench_runs_at_its_smoke_size(tmp_path):
    """experiments/kernel_dev/bench_backward_kernel.py times the backward kernel with a part taken out in interpret
    mode, and hands mosaic_gpu_intra back as it found it (its forms patch the module while a kernel is traced)."""
    import json
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import bench_backward_kernel

    from gateloop_jax.ops import mosaic_gpu_intra

    before = (mosaic_gpu_intra.jax, mosaic_gpu_intra._cross_key_rows, mosaic_gpu_intra._Ctx.decay)
    forms = ["backward_one_offset", "backward_no_cross"]
    bench_backward_kernel.main(["--smoke", "--out", str(tmp_path), "--forms", ",".join(forms)])
    result = json.loads((tmp_path / "backward_kernel.json").read_text())
    assert [r["form"] for r in result["records"] if "ms" in r] == ["gate_factors", *forms], result["records"]
    assert (mosaic_gpu_intra.jax, mosaic_gpu_intra._cross_key_rows, mosaic_gpu_intra._Ctx.decay) == before


@needs_mosaic
def test_gate_factors_bench_runs_at_its_smoke_size(tmp_path):
    """experiments/kernel_dev/bench_gate_factors.py times the gate-factor kernel by form in interpret mode, names the
    fastest exact one, and each exact form gives the default kernel's factors."""
    import json
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import bench_gate_factors

    from gateloop_jax.ops import mosaic_gpu_gates

    timed = ["kernel", "kernel_tma_4chunks", "kernel_unrolled", "kernel_no_sums"]
    bench_gate_factors.main(["--smoke", "--out", str(tmp_path), "--forms", ",".join(timed)])
    result = json.loads((tmp_path / "gate_factors.json").read_text())
    assert [r["form"] for r in result["records"] if "ms" in r] == timed
    assert result["best_kernel_form"] in timed[:3]
    lr = -jnp.abs(jnp.asarray(np.random.default_rng(0).standard_normal((1, 256, 1, 64)), jnp.float32))
    want = bench_gate_factors.factors_fn("kernel_unrolled", True)(lr, lr)

    def settings():
        return (mosaic_gpu_gates.GATES_IO, mosaic_gpu_gates.GATES_PER_PROGRAM, mosaic_gpu_gates.GATES_APPROX_MATH,
                mosaic_gpu_gates.GATES_LOOP)

    defaults = settings()
    saved = bench_gate_factors.apply_form("kernel_tma_4chunks")
    try:
        got = mosaic_gpu_gates._factors_kernel(lr, lr, sub=True, interpret=True)
    finally:
        bench_gate_factors.restore_form(saved)
    assert settings() == defaults
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_mosaic
def test_kernel_code_size_counts_each_kernel(tmp_path):
    """experiments/kernel_dev/kernel_code_size.py lowers the op's fwd+bwd for CUDA on this CPU and counts each Mosaic
    GPU kernel's code: every kernel of the op is there, and the gate-factor kernel's windows in one loop body are less
    code, with a sixth of the full-precision exp / sin / cos, than unrolled."""
    import json
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import kernel_code_size

    sizes = {}
    for form in ("kernel", "kernel_unrolled"):
        kernel_code_size.main(["--out", str(tmp_path), "--json", f"{form}.json", "--gate_factors", "kernel",
                               "--gates_form", form])
        records = json.loads((tmp_path / f"{form}.json").read_text())["kernels"]
        assert {r["kernel"].split("_mosaic")[0] for r in records} == {
            "gateloop_gate_factors", "gateloop_forward_kernel", "gateloop_backward_kernel", "gateloop_state_pass",
            "gateloop_gate_grad_sums"}
        sizes[form] = next(r for r in records if r["kernel"].startswith("gateloop_gate_factors"))
    assert sizes["kernel"]["mlir_lines"] < 0.7 * sizes["kernel_unrolled"]["mlir_lines"]
    assert 6 * sizes["kernel"]["precise_transcendentals"] == sizes["kernel_unrolled"]["precise_transcendentals"] > 0


def test_ptxas_report_reads_registers_and_spills_per_kernel(tmp_path):
    """experiments/kernel_dev/ptxas_report.py (GPU only) reads Mosaic GPU's dumps: per kernel, the ptxas lines that
    name registers and spills and the resource summary; the PTX and the other lines are left out."""
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import ptxas_report

    (tmp_path / "gateloop_backward_kernel_3.ptxas").write_text(
        "ptxas info    : Compiling entry function 'gateloop_backward_kernel_mosaic_gpu_kernel'\n"
        "ptxas info    : Function properties for gateloop_backward_kernel_mosaic_gpu_kernel\n"
        "    224 bytes stack frame, 512 bytes spill stores, 1280 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 2 barriers\n")
    (tmp_path / "gateloop_backward_kernel_3.resources.txt").write_text("Resources(smem_scratch_bytes=138240)\n")
    (tmp_path / "gateloop_backward_kernel_3.ptx").write_text(".reg .f32 %f<255>;\n")
    report = ptxas_report.kernel_resources(str(tmp_path))
    assert list(report) == ["gateloop_backward_kernel_3"]
    assert report["gateloop_backward_kernel_3"] == [
        "224 bytes stack frame, 512 bytes spill stores, 1280 bytes spill loads",
        "ptxas info    : Used 255 registers, used 2 barriers", "Resources(smem_scratch_bytes=138240)"]


def test_window_sums_bench_runs_at_its_smoke_size(tmp_path):
    """experiments/kernel_dev/bench_window_sums.py times every method in both directions at its smoke size."""
    import json
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import bench_window_sums
    from gateloop_jax.ops.mosaic_gpu_common import WINDOW_SUM_METHODS

    bench_window_sums.main(["--smoke", "--out", str(tmp_path)])
    records = json.loads((tmp_path / "window_sums.json").read_text())["records"]
    assert {r["method"] for r in records} == set(WINDOW_SUM_METHODS) and len(records) == 8 * len(WINDOW_SUM_METHODS)
    assert all(r["ms"] > 0 for r in records)


@needs_mosaic
def test_profile_script_times_every_stage_of_a_variant(tmp_path):
    """experiments/kernel_dev/profile_mosaic_gpu.py (run on the GPU to split the time between the kernels and XLA)
    runs end to end at its smoke size and records every stage; a variant not in VARIANTS is refused by name."""
    import json
    import sys

    sys.path.insert(0, _KERNEL_DEV)
    import profile_mosaic_gpu

    profile_mosaic_gpu.main(["--smoke", "--variants", "padded_subblock", "--out", str(tmp_path)])
    (record,) = json.loads((tmp_path / "mosaic_profile.json").read_text())["records"]
    assert "error" not in record, record
    stages = ("factors", "fwd_kernel", "fwd_total", "bwd_kernel", "bwd_total", "fwd_bwd_total", "fwd_xla", "bwd_xla")
    assert set(record["ms"]) == set(stages)
    with pytest.raises(SystemExit):
        profile_mosaic_gpu.main(["--smoke", "--variants", "no_such_variant", "--out", str(tmp_path)])


@needs_mosaic
def test_backward_keeps_only_the_operands_of_each_stacked_op():
    """What jax.grad through L stacked ops keeps per op (XLA's compiled temp memory, its growth from 2 to 6 ops): the
    operands as passed (bf16 q, k, v here), not the padded float32 copies and chunk-start states, which the backward
    rebuilds (_core_bwd). Those would be 5 x t x 128 x 4 bytes + (t / 64) x 128 x 128 x 8 bytes = 0.59 MB an op at
    t = 128, d = 96 padded to 128; the rebuilt form keeps ~0.1 MB (bf16 operands, y, the residual stream)."""
    b, t, h, d = 1, 128, 1, 96

    def temp_bytes(n_ops):
        def loss(ws, x, log_r, theta):
            for w in ws:
                q = jnp.tanh(x @ w).astype(jnp.bfloat16).reshape(b, t, h, d)
                y, _ = pm.gateloop_mosaic_gpu(q, q, q, log_r, theta, None)
                x = x + y.reshape(b, t, h * d)
            return jnp.sum(x * x)

        args = ([jnp.eye(h * d) * 0.5] * n_ops, jnp.ones((b, t, h * d)), jnp.full((b, t, h, d), -0.1),
                jnp.ones((b, t, h, d)))
        return jax.jit(jax.grad(loss)).lower(*args).compile().memory_analysis().temp_size_in_bytes

    per_op = (temp_bytes(6) - temp_bytes(2)) / 4
    saved_form = 5 * t * 128 * 4 + (t // 64) * 128 * 128 * 8
    assert per_op < 0.4 * saved_form, (per_op, saved_form)
