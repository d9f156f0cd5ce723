"""segment_ids (packed sequences: the state restarts wherever the id changes) in every mode of ops.gateloop.

Against the float64 oracle (tests/reference.py, a = 0 exactly at each segment start): y, the final state and every
gradient (q, k, v, log|a|, arg a, the initial state; the loss includes a final-state cotangent), with the gradients of
log|a| and arg a at the starts exactly 0. And "packed == alone": a row of several segments gives, segment by segment,
what each gives run on its own. Seeds as in tests/ops_test.py (GATELOOP_TEST_SEED).

Tolerances: those of tests/ops_test.py for lengths up to 63 (2e-5 forward, 1e-4 gradients, relative to the output's
scale: float32 sums of up to t terms in different orders, measured ~1e-7); a reset only removes terms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gateloop_jax import ops
from gateloop_jax.ops import PolarTransition, gateloop
from ops_test import SEED, make_inputs
from reference import gateloop_backward, gateloop_forward, max_rel_error, segment_starts

MODES = ops.SEGMENT_MODES
LAYOUTS = {"multihead": dict(b=2, h=2, dk=4, dv=3), "maxheaded": dict(b=2, h=3, dk=1, dv=1)}
# Chunk sizes that put segment starts on chunk (and, multi-head, sub-block) edges: "chunked" multi-head 32 = two
# sub-blocks of 16; max-headed 8; "pallas" multi-head 16 (its default) and 32 (two sub-blocks).
CHUNKS = {("chunked", "multihead"): 32, ("chunked", "maxheaded"): 8, ("pallas", "multihead"): 32}


def segment_layout(name, rng, b, t):
    """(b, t) int ids. Row 1 of every layout but "one_segment" has starts at random (ids reused: 0, 1, 0, ... - a
    change of id is what starts a segment, not a new id)."""
    ids = np.zeros((b, t), np.int32)
    random_starts = rng.uniform(size=t) < 0.25
    random_starts[0] = False
    if name == "one_segment":
        return ids + 7
    if name == "every_position":  # single-position segments throughout
        ids[0] = np.arange(t)
    elif name == "start_at_1":  # a one-position first segment: the initial state reaches position 0 only
        ids[0, 1:] = 1
    elif name == "chunk_edges":  # starts on the edges of chunks of 8, 16 and 32, and beside them
        for start in (8, 15, 16, 17, 32):
            ids[0, start:] += 1
    ids[1] = np.cumsum(random_starts) % 2
    return ids


# (segment layout, length, gates, carried state)
CASES = [
    ("one_segment", 9, "mixed", True),
    ("every_position", 7, "mixed", True),
    ("start_at_1", 9, "near_one", True),
    ("chunk_edges", 37, "mixed", True),
    ("chunk_edges", 37, "near_zero", False),
    ("chunk_edges", 37, "near_one", False),
]


def run_mode(mode, inputs, segment_ids, dy, dfinal, chunk_size):
    """y, final state and the gradients of sum(dy * y) + Re<dfinal, H_t> w.r.t. (q, k, v, log_r, theta, h0)."""

    def f(q, k, v, log_r, theta, h0):
        return gateloop(q, k, v, PolarTransition(log_r, theta), mode=mode, initial_state=h0, return_state=True,
                        chunk_size=chunk_size, segment_ids=segment_ids)

    return run_fn(f, inputs, dy, dfinal)


def run_fn(f, inputs, dy, dfinal):
    """run_mode for any f(q, k, v, log_r, theta, h0) -> (y, final state)."""
    q, k, v, log_r, theta, h0 = inputs
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    h0 = None if h0 is None else jnp.asarray(h0, jnp.complex64)

    @jax.jit
    def forward_and_grads(q, k, v, log_r, theta, h0, dy, dfinal):
        (y, final), vjp = jax.vjp(f, q, k, v, log_r, theta, h0)
        # The cotangent of a complex output is conj(d/dRe + i d/dIm) in JAX's convention.
        return y, final, vjp((dy, jnp.conj(dfinal)))

    return forward_and_grads(f32(q), f32(k), f32(v), f32(log_r), f32(theta), h0, f32(dy),
                             jnp.asarray(dfinal, jnp.complex64))


@pytest.mark.parametrize("segments, t, gates, with_state", CASES, ids=[f"{s}-t{t}-{g}-{'h0' if h else 'zero'}"
                                                                       for s, t, g, h in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_segments_match_oracle(mode, layout, segments, t, gates, with_state):
    rng = np.random.default_rng([SEED, 53, MODES.index(mode), t, len(segments), len(gates), with_state, len(layout)])
    check_segments(mode, layout, segments, t, gates, with_state, rng,
                   lambda inputs, ids, dy, dfinal: run_mode(mode, inputs, jnp.asarray(ids), dy, dfinal,
                                                            CHUNKS.get((mode, layout))))


TPU_CASES = [("chunk_edges", 37, "mixed", True), ("every_position", 7, "near_zero", True)]


@pytest.mark.parametrize("segments, t, gates, with_state", TPU_CASES, ids=[f"{s}-t{t}-{g}" for s, t, g, _ in TPU_CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tpu_kernel_segments_match_oracle(layout, segments, t, gates, with_state):
    """The Mosaic TPU kernel (what mode="pallas" runs on a TPU, every shape) in interpret mode, as
    tests/pallas_tpu_test.py runs it: chunks of 16 in sub-blocks of 8, so starts fall on both edges."""
    from gateloop_jax.ops import pallas_tpu
    from gateloop_jax.ops.common import segment_starts as starts_of

    def run(inputs, ids, dy, dfinal):
        reset = starts_of(jnp.asarray(ids))
        f = lambda *x: pallas_tpu.gateloop_pallas_tpu(*x, chunk_size=16, interpret=True, reset=reset)  # noqa: E731
        return run_fn(f, inputs, dy, dfinal)

    rng = np.random.default_rng([SEED, 67, t, len(layout)])
    check_segments("pallas_tpu", layout, segments, t, gates, with_state, rng, run)


def check_segments(mode, layout, segments, t, gates, with_state, rng, run):
    """Inputs, ids and cotangents from rng; run(inputs, ids, dy, dfinal) -> (y, final, grads) against the oracle."""
    dims = LAYOUTS[layout]
    inputs = make_inputs(rng, t=t, gates=gates, with_state=with_state, **dims)
    ids = segment_layout(segments, rng, dims["b"], t)
    dy = rng.normal(size=inputs[2].shape)
    state_shape = (dims["b"], dims["h"], dims["dk"], dims["dv"])
    dfinal = rng.normal(size=state_shape) + 1j * rng.normal(size=state_shape)
    ref_y, ref_states = gateloop_forward(*inputs, segment_ids=ids)
    ref_grads = gateloop_backward(*inputs, dy, segment_ids=ids, dfinal=dfinal)

    y, final, grads = run(inputs, ids, dy, dfinal)
    where = f"mode={mode} {layout} {segments} t={t} {gates} seed={SEED}"
    # 2e-5 / 1e-4: see the module docstring.
    assert max_rel_error(y, ref_y) <= 2e-5, f"y ({where})"
    final = np.asarray(final)
    for part in (np.real, np.imag):
        assert max_rel_error(part(final), part(ref_states[:, -1])) <= 2e-5, f"final state ({where})"
    starts = segment_starts(ids, (dims["b"], t))
    # The chunked Pallas kernels (multi-head GPU, and TPU for every shape) form dlog|a| and darg a as reverse sums of
    # q Re(Dq) - k Re(Dk) (their docstrings): under strong forgetting those terms, of size up to |q| |k| |v| |dy|
    # d_qk d_v, cancel to a gradient of the size of |a| <= 1e-3. Float32 leaves an absolute error set by the terms,
    # not by the gradient: at most 2.2e-8 of the terms' size (pallas_tpu, max-headed, every_position, t = 7, 61
    # seeds), which against the gradient's own scale was up to 2.6e-3. So there the bound is 2e-7 of the terms' size
    # (every other mode and gate regime: 1e-4 of the gradient's scale, measured <= 1e-6).
    decomposed = mode == "pallas_tpu" or (mode, layout) == ("pallas", "multihead")
    q, k, v = (np.asarray(x) for x in inputs[:3])
    terms = (np.max(np.abs(q)) * np.max(np.abs(k)) * np.max(np.abs(v)) * np.max(np.abs(dy)) * dims["dk"]
             * dims["dv"])
    for name, g, ref in zip(("q", "k", "v", "log_r", "theta", "h0"), grads, ref_grads):
        if name == "h0":
            if with_state:  # JAX's cotangent of a complex input is conj(d/dRe + i d/dIm)
                g = np.conj(np.asarray(g))
                for part in (np.real, np.imag):
                    assert max_rel_error(part(g), part(ref)) <= 1e-4, f"grad h0 ({where})"
            continue
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), f"grad {name} not finite ({where})"
        if decomposed and gates == "near_zero" and name in ("log_r", "theta"):
            error = np.max(np.abs(g - ref)) / terms
            assert error <= 2e-7, f"grad {name} {error:.1e} of the cancelling terms ({where})"
        else:
            assert max_rel_error(g, ref) <= 1e-4, f"grad {name} {max_rel_error(g, ref):.1e} ({where})"
        if name in ("log_r", "theta"):  # the gate at a start is unused: exactly no gradient, as in the oracle
            assert np.all(g[starts] == 0.0), f"grad {name} at segment starts not 0 ({where})"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_packed_row_equals_each_segment_alone(mode, layout):
    """One row packing segments of lengths 5, 1, 16, 2, 9 (the 16 spanning a chunk edge) == each segment run as a
    row of its own (left-aligned, padded with identity steps, which change nothing); the initial state reaches the
    first segment only and the final state is the last segment's. 2e-5 of the output scale: both sides are float32
    computations of the same sums (see the module docstring)."""
    rng = np.random.default_rng([SEED, 59, MODES.index(mode), len(layout)])
    lengths = (5, 1, 16, 2, 9)
    t = sum(lengths)
    dims = dict(LAYOUTS[layout], b=1)
    q, k, v, log_r, theta, h0 = make_inputs(rng, t=t, gates="mixed", with_state=True, **dims)
    ids = np.repeat(np.arange(len(lengths)), lengths)[None]
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    run = jax.jit(lambda q, k, v, lr, th, h0, ids: gateloop(q, k, v, PolarTransition(lr, th), mode=mode,
                                                            initial_state=h0, return_state=True, segment_ids=ids,
                                                            chunk_size=CHUNKS.get((mode, layout))))
    y, final = run(f32(q), f32(k), f32(v), f32(log_r), f32(theta), jnp.asarray(h0, jnp.complex64), jnp.asarray(ids))

    # Row i: segment i alone, zero-padded (q = k = v = 0, log|a| = 0, phase 0: identity steps).
    alone = [np.zeros((len(lengths), t) + x.shape[2:], x.dtype) for x in (q, k, v, log_r, theta)]
    bounds = np.cumsum((0,) + lengths)
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        for dst, src in zip(alone, (q, k, v, log_r, theta)):
            dst[i, : e - s] = src[0, s:e]
    h0_alone = np.zeros((len(lengths),) + h0.shape[1:], h0.dtype)
    h0_alone[0] = h0[0]
    y_alone, final_alone = run(*(f32(x) for x in alone), jnp.asarray(h0_alone, jnp.complex64),
                               jnp.zeros((len(lengths), t), jnp.int32))
    y, y_alone = np.asarray(y), np.asarray(y_alone)
    scale = np.max(np.abs(y))
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        np.testing.assert_allclose(y[0, s:e], y_alone[i, : e - s], rtol=0, atol=2e-5 * scale,
                                   err_msg=f"segment {i} mode={mode} seed={SEED}")
    final_scale = np.max(np.abs(np.asarray(final_alone[-1])))
    np.testing.assert_allclose(final[0], final_alone[-1], rtol=0, atol=2e-5 * final_scale)


def test_no_segment_ids_and_one_segment_agree():
    """segment_ids=None traces the computation without resets; ids that never change give the same result."""
    rng = np.random.default_rng([SEED, 61])
    q, k, v, log_r, theta, _ = (jnp.asarray(x, jnp.float32) if x is not None else None
                                for x in make_inputs(rng, b=2, t=20, h=2, dk=4, dv=3, gates="mixed", with_state=False))
    a = PolarTransition(log_r, theta)
    plain = jax.make_jaxpr(lambda *x: gateloop(*x, mode="chunked"))(q, k, v, a)
    none = jax.make_jaxpr(lambda *x: gateloop(*x, mode="chunked", segment_ids=None))(q, k, v, a)
    assert str(plain) == str(none)
    same = gateloop(q, k, v, a, mode="chunked", segment_ids=jnp.full((2, 20), 3))
    # Masks that select everything: the same float32 operations, so 1e-6 of the scale (rounding of fused ops).
    np.testing.assert_allclose(same, gateloop(q, k, v, a, mode="chunked"), rtol=0,
                               atol=1e-6 * float(jnp.max(jnp.abs(same))))


@pytest.mark.parametrize("segment_ids, mode, pattern", [
    (jnp.zeros((2, 4), jnp.int32), "scan", r"'segment_ids' has shape \(2, 4\), expected \(2, 5\)"),
    (jnp.zeros((2, 5), jnp.float32), "scan", r"'segment_ids' must be an integer array .*got dtype float32"),
    (jnp.zeros((2, 5), jnp.int32), "gla_rotation", r"segment_ids is not supported by mode='gla_rotation'"),
])
def test_bad_segment_ids_raise_one_clear_error(segment_ids, mode, pattern):
    z = jnp.zeros((2, 5, 3, 4))
    with pytest.raises(ValueError, match=pattern):
        gateloop(z, z, jnp.zeros((2, 5, 3, 2)), z.astype(jnp.complex64), mode=mode, segment_ids=segment_ids)
