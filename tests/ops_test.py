"""Every mode of ops.gateloop against the float64 NumPy oracle, forward and gradients.

Inputs are fresh each run (seed printed in every failure; fix it with GATELOOP_TEST_SEED=<int>). Errors are
max|x - ref| / max|ref| (tests/reference.py:max_rel_error), i.e. relative to the output's scale.

Tolerances (float32): each output is a sum of up to t terms, each carrying a few float32 roundings
(eps = 6e-8); the different modes sum in different orders (tree, sequential, segment sums), so their errors
grow like sqrt(t) * eps * (cond), with the decay factors exp(sum log|a|) adding a relative error of about
|sum log|a|| * eps. 2e-5 covers lengths up to 63 with two decades of margin over the ~1e-7 we measure;
the long-length test allows 2e-4 (measured ~1e-5 at 2049 with |a| = 1 and phases up to 3 pi).
Gradients sum over the same products once more in reverse, so they get the same bound times 5.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gateloop_jax import ops
from gateloop_jax.ops import PolarTransition, gateloop, gateloop_step
from reference import gateloop_backward, gateloop_forward, max_rel_error

SEED = int(os.environ.get("GATELOOP_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
MODES = ops.MODES
LAYOUTS = {"multihead": dict(b=2, h=2, dk=4, dv=3), "maxheaded": dict(b=2, h=5, dk=1, dv=1)}
GATES = ("mixed", "near_zero", "near_one")


def make_inputs(rng, *, b, t, h, dk, dv, gates, with_state):
    q, k = rng.normal(size=(2, b, t, h, dk))
    v = rng.normal(size=(b, t, h, dv))
    if gates == "mixed":  # |a| spread over (0, 1): short and long memories side by side
        magnitude = rng.uniform(0.0, 1.0, size=(b, t, h, dk))
    elif gates == "near_zero":  # forgets almost everything at once; includes exact zeros below the float floor
        magnitude = rng.uniform(0.0, 1e-3, size=(b, t, h, dk)) * (rng.uniform(size=(b, t, h, dk)) > 0.1)
    else:  # remembers nearly forever; includes |a| = 1 exactly
        magnitude = 1.0 - rng.uniform(0.0, 1e-3, size=(b, t, h, dk)) * (rng.uniform(size=(b, t, h, dk)) > 0.1)
    log_r = np.log(np.maximum(magnitude, ops.common.MIN_MAGNITUDE))
    theta = rng.uniform(-3 * np.pi, 3 * np.pi, size=(b, t, h, dk))  # phases up to several pi
    h0 = None
    if with_state:
        h0 = rng.normal(size=(b, h, dk, dv)) + 1j * rng.normal(size=(b, h, dk, dv))
    return q, k, v, log_r, theta, h0


def run_mode(mode, q, k, v, log_r, theta, h0, dy, chunk_size=None):
    """y, final state and gradients w.r.t. (q, k, v, log_r, theta, h0) of sum(dy * y)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    h0_j = None if h0 is None else jnp.asarray(h0, jnp.complex64)

    def f(q, k, v, log_r, theta, h0):
        return gateloop(q, k, v, PolarTransition(log_r, theta), mode=mode, initial_state=h0, return_state=True,
                        chunk_size=chunk_size)

    @jax.jit
    def forward_and_grads(q, k, v, log_r, theta, h0, dy):
        (y, final), vjp = jax.vjp(f, q, k, v, log_r, theta, h0)
        return y, final, vjp((dy, jnp.zeros_like(final)))

    return forward_and_grads(f32(q), f32(k), f32(v), f32(log_r), f32(theta), h0_j, f32(dy))


def check_against_oracle(mode, inputs, rng, *, rtol, grad_rtol, chunk_size=None, tag="", grad_rtol_for=None):
    """grad_rtol_for: {input name: tolerance} where one gradient needs its own (justified where it is passed)."""
    q, k, v, log_r, theta, h0 = inputs
    dy = rng.normal(size=v.shape)
    ref_y, ref_states = gateloop_forward(q, k, v, log_r, theta, h0)
    ref_grads = gateloop_backward(q, k, v, log_r, theta, h0, dy)
    y, final, grads = run_mode(mode, q, k, v, log_r, theta, h0, dy, chunk_size=chunk_size)
    where = f"mode={mode} {tag} seed={SEED}"
    assert np.all(np.isfinite(y)), where
    err = max_rel_error(y, ref_y)
    assert err <= rtol, f"forward error {err:.2e} > {rtol:.0e} ({where})"
    ref_final = ref_states[:, -1]
    final_err = np.max(np.abs(np.asarray(final) - ref_final)) / max(np.max(np.abs(ref_final)), 1e-30)
    assert final_err <= rtol, f"final state error {final_err:.2e} > {rtol:.0e} ({where})"
    names = ("q", "k", "v", "log_r", "theta", "h0")
    for name, g, ref in zip(names, grads, ref_grads):
        if name == "h0" and h0 is None:
            continue
        if name == "h0":
            # JAX's cotangent for a complex input of a real loss is d/dRe - i d/dIm: the conjugate of the oracle's.
            g = np.conj(np.asarray(g))
            assert max_rel_error(np.real(g), np.real(ref)) <= grad_rtol, f"grad h0.real ({where})"
            assert max_rel_error(np.imag(g), np.imag(ref)) <= grad_rtol, f"grad h0.imag ({where})"
            continue
        assert np.all(np.isfinite(g)), f"grad {name} not finite ({where})"
        gerr = max_rel_error(g, ref)
        tol = (grad_rtol_for or {}).get(name, grad_rtol)
        assert gerr <= tol, f"grad {name} error {gerr:.2e} > {tol:.0e} ({where})"


# (length, gates, carried state): lengths 1, odd, chunk-crossing; every gate regime with and without a carried state,
# without the full cross product (each case costs an XLA compile of the forward and backward pass).
CASES = [
    (1, "mixed", False), (1, "near_zero", True), (1, "near_one", True),
    (7, "mixed", False), (7, "mixed", True), (7, "near_zero", False), (7, "near_one", True),
    (63, "mixed", True), (63, "near_zero", True), (63, "near_one", False),
]


@pytest.mark.parametrize("t, gates, with_state", CASES, ids=[f"t{t}-{g}-{'h0' if s else 'zero'}" for t, g, s in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_oracle(mode, layout, t, gates, with_state):
    rng = np.random.default_rng([SEED, MODES.index(mode), t, GATES.index(gates), with_state, len(layout)])
    inputs = make_inputs(rng, t=t, gates=gates, with_state=with_state, **LAYOUTS[layout])
    check_against_oracle(mode, inputs, rng, rtol=2e-5, grad_rtol=1e-4, tag=f"{layout} t={t} gates={gates}",
                         chunk_size=16 if mode == "chunked" else None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_long_odd_length_matches_oracle(mode, layout):
    rng = np.random.default_rng([SEED, MODES.index(mode), 2049, len(layout)])
    dims = dict(b=1, h=1, dk=2, dv=2) if layout == "multihead" else dict(b=1, h=3, dk=1, dv=1)
    inputs = make_inputs(rng, t=2049, gates="near_one", with_state=True, **dims)
    check_against_oracle(mode, inputs, rng, rtol=2e-4, grad_rtol=1e-3, tag=f"{layout} t=2049")


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 100])
def test_chunked_any_chunk_size(chunk_size):
    """Chunk sizes that do not divide the length (internal identity padding) and chunks longer than the input."""
    rng = np.random.default_rng([SEED, chunk_size])
    inputs = make_inputs(rng, b=2, t=37, h=2, dk=3, dv=2, gates="mixed", with_state=True)
    check_against_oracle("chunked", inputs, rng, rtol=2e-5, grad_rtol=1e-4, chunk_size=chunk_size)


@pytest.mark.parametrize("mode", MODES)
def test_complex_input_and_exact_zero_gates(mode):
    """The public complex-`a` path: a = 0 exactly must give finite outputs and gradients."""
    rng = np.random.default_rng([SEED, 7, MODES.index(mode)])
    b, t, h, dk, dv = 1, 9, 2, 3, 2
    q, k = rng.normal(size=(2, b, t, h, dk))
    v = rng.normal(size=(b, t, h, dv))
    a = rng.uniform(0, 1, size=(b, t, h, dk)) * np.exp(1j * rng.uniform(-np.pi, np.pi, size=(b, t, h, dk)))
    a[:, 3] = 0.0
    ref_y, _ = gateloop_forward(q, k, v, np.log(np.maximum(np.abs(a), 1e-30)), np.angle(a))
    y = jax.jit(gateloop, static_argnames="mode")(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                                  jnp.asarray(v, jnp.float32), jnp.asarray(a, jnp.complex64), mode=mode)
    assert max_rel_error(y, ref_y) <= 2e-5, f"seed={SEED}"
    loss = lambda a_re, a_im: jnp.sum(gateloop(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                               jnp.asarray(v, jnp.float32), jax.lax.complex(a_re, a_im), mode=mode))
    a_re32, a_im32 = jnp.asarray(a.real, jnp.float32), jnp.asarray(a.imag, jnp.float32)
    g_re, g_im = jax.jit(jax.grad(loss, argnums=(0, 1)))(a_re32, a_im32)
    assert np.all(np.isfinite(g_re)) and np.all(np.isfinite(g_im))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs(mode, layout):
    """bf16 q, k, v: the recurrence still accumulates in float32; the only loss is the bf16 output rounding
    (2^-8 = 3.9e-3 relative) on top of the float32 error, so 1e-2 of the output scale."""
    rng = np.random.default_rng([SEED, 11, MODES.index(mode), len(layout)])
    q, k, v, log_r, theta, h0 = make_inputs(rng, t=40, gates="mixed", with_state=False, **LAYOUTS[layout])
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    qb, kb, vb = bf16(q), bf16(k), bf16(v)
    y = jax.jit(gateloop, static_argnames="mode")(qb, kb, vb, PolarTransition(jnp.asarray(log_r),
                                                  jnp.asarray(theta)), mode=mode)
    assert y.dtype == jnp.bfloat16
    as64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
    ref_y, _ = gateloop_forward(as64(qb), as64(kb), as64(vb), log_r, theta)
    assert max_rel_error(y.astype(jnp.float32), ref_y) <= 1e-2, f"seed={SEED}"
    transition = PolarTransition(jnp.asarray(log_r), jnp.asarray(theta))
    grads = jax.jit(jax.grad(lambda q: jnp.sum(gateloop(q, kb, vb, transition, mode=mode).astype(jnp.float32))))(qb)
    assert grads.dtype == jnp.bfloat16 and np.all(np.isfinite(grads.astype(jnp.float32)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_steps_continue_a_parallel_prefill(layout):
    """Prefill with a parallel mode, then gateloop_step token by token == one pass over the whole sequence."""
    rng = np.random.default_rng([SEED, 13, len(layout)])
    q, k, v, log_r, theta, _ = make_inputs(rng, t=20, gates="mixed", with_state=False, **LAYOUTS[layout])
    q, k, v, log_r, theta = (jnp.asarray(x, jnp.float32) for x in (q, k, v, log_r, theta))
    full = gateloop(q, k, v, PolarTransition(log_r, theta), mode="scan")
    _, state = gateloop(q[:, :12], k[:, :12], v[:, :12], PolarTransition(log_r[:, :12], theta[:, :12]),
                        mode="chunked", return_state=True)
    for n in range(12, 20):
        y_n, state = gateloop_step(q[:, n], k[:, n], v[:, n], PolarTransition(log_r[:, n], theta[:, n]), state)
        np.testing.assert_allclose(y_n, full[:, n], rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(full))))


def test_modes_are_jittable_and_agree_under_jit():
    rng = np.random.default_rng([SEED, 17])
    q, k, v, log_r, theta, _ = make_inputs(rng, b=1, t=33, h=2, dk=4, dv=4, gates="mixed", with_state=False)
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)] + [PolarTransition(jnp.asarray(log_r, jnp.float32),
                                                                               jnp.asarray(theta, jnp.float32))]
    ys = {m: jax.jit(gateloop, static_argnames=("mode",))(*args, mode=m) for m in MODES + ("auto",)}
    for m, y in ys.items():
        assert max_rel_error(y, ys["recurrent"]) <= 2e-5, m


def _bad_call(**overrides):
    b, t, h, dk, dv = 2, 5, 3, 4, 2
    kw = dict(q=jnp.zeros((b, t, h, dk)), k=jnp.zeros((b, t, h, dk)), v=jnp.zeros((b, t, h, dv)),
              a=jnp.zeros((b, t, h, dk), jnp.complex64))
    kw.update(overrides)
    options = {name: kw.pop(name) for name in ("mode", "initial_state", "chunk_size") if name in kw}
    return gateloop(kw["q"], kw["k"], kw["v"], kw["a"], **options)


@pytest.mark.parametrize("overrides, pattern", [
    (dict(q=jnp.zeros((2, 5, 3))), r"'q' has shape \(2, 5, 3\), expected rank 4"),
    (dict(k=jnp.zeros((2, 5, 3, 5))), r"'k' has shape \(2, 5, 3, 5\), expected \(2, 5, 3, 4\)"),
    (dict(v=jnp.zeros((2, 6, 3, 2))), r"'v' has shape \(2, 6, 3, 2\), expected \(2, 5, 3, d_v\)"),
    (dict(a=jnp.zeros((2, 5, 3, 4))), r"'a' must be complex .* got dtype float32 with shape \(2, 5, 3, 4\)"),
    (dict(a=jnp.zeros((2, 5, 3, 1), jnp.complex64)), r"'a' has shape \(2, 5, 3, 1\), expected \(2, 5, 3, 4\)"),
    (dict(mode="fast"), r"unknown mode 'fast'"),
    (dict(initial_state=jnp.zeros((2, 3, 4, 3), jnp.complex64)),
     r"'initial_state' has shape \(2, 3, 4, 3\), expected \(2, 3, 4, 2\)"),
    (dict(mode="scan", chunk_size=4), r"chunk_size=4 only applies to mode='chunked'"),
    (dict(mode="chunked", chunk_size=0), r"chunk_size must be a positive int, got 0"),
])
def test_bad_input_raises_one_clear_error(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        _bad_call(**overrides)


def test_auto_mode_resolution():
    assert ops.resolve_mode("auto", (1, 8, 512, 1), (1, 8, 512, 1), platform="cpu") == "scan"
    assert ops.resolve_mode("auto", (1, 8, 512, 1), (1, 8, 512, 1), platform="gpu") == "pallas"
    assert ops.resolve_mode("auto", (1, 8, 8, 64), (1, 8, 8, 64), platform="cpu") == "chunked"
    assert ops.resolve_mode("auto", (1, 8, 8, 64), (1, 8, 8, 64), platform="gpu") == "pallas"
    assert ops.resolve_mode("auto", (1, 8, 8, 96), (1, 8, 8, 96), platform="gpu") == "chunked"  # padded: spills
    assert ops.resolve_mode("recurrent", (1, 8, 8, 64), (1, 8, 8, 64)) == "recurrent"


def test_auto_mode_on_hopper_picks_mosaic_gpu_for_wide_heads_only(monkeypatch):
    """On a GPU that Mosaic GPU serves: heads wider than 64 on either side get "mosaic_gpu" (they fit where "chunked"
    does not), narrower ones keep the faster Triton kernel, packed rows (no state reset in the Mosaic GPU kernel)
    fall back to "chunked"; without it (another GPU, jax < 0.11) wide heads get "chunked"."""
    from gateloop_jax.ops import pallas_mosaic_gpu

    def auto(dk, dv, segments=False):
        return ops.resolve_mode("auto", (1, 8, 8, dk), (1, 8, 8, dv), platform="gpu", segments=segments)

    monkeypatch.setattr(pallas_mosaic_gpu, "serves_default_device", lambda: True)
    assert [auto(d, d) for d in (32, 64, 96, 128, 256)] == ["pallas"] * 2 + ["mosaic_gpu"] * 3
    assert auto(32, 96) == auto(256, 64) == "mosaic_gpu"
    assert auto(96, 96, segments=True) == "chunked" and auto(64, 64, segments=True) == "pallas"
    monkeypatch.setattr(pallas_mosaic_gpu, "serves_default_device", lambda: False)
    assert auto(96, 96) == "chunked" and auto(64, 64) == "pallas"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "carried_state"])
def test_pallas_mode_through_the_public_entry_point(with_state, layout):
    """mode="pallas" (the elementwise kernel max-headed, the chunked kernel multi-head; Pallas interpret mode on CPU)
    agrees with the oracle like every mode."""
    rng = np.random.default_rng([SEED, 19, with_state, len(layout)])
    inputs = make_inputs(rng, t=23, gates="mixed", with_state=with_state, **LAYOUTS[layout])
    check_against_oracle("pallas", inputs, rng, rtol=2e-5, grad_rtol=1e-4, tag=f"{layout} t=23")
