"""Context parallelism on 8 fake CPU devices: the length split over the mesh axis "sequence".

The op under sequence = 2, 4, 8 against the float64 oracle (forward, final state and gradients), every mode; the
mixers under the trainer's mesh and rules (GateLoop and the Transformer's attention); prefill then decode; training
with data=1, sequence=4 against data=4; a length the axis does not divide.

Tolerances: the oracle ones of tests/ops_test.py (2e-5 forward, 1e-4 gradients, relative to the output's scale):
the split adds one (t, k) x (k, v) correction product and a scan over at most 8 shard summaries, a few float32
roundings on top of the local op's (measured ~5e-7 here).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gateloop_jax
from gateloop_jax import context_parallel
from gateloop_jax.models import build_model, preset_config
from gateloop_jax.ops import PolarTransition
from gateloop_jax.ops.context_parallel import gateloop_context_parallel
from gateloop_jax.sharding import DEFAULT_RULES, make_mesh
from ops_test import LAYOUTS, SEED, make_inputs
from reference import gateloop_backward, gateloop_forward, max_rel_error

FWD_TOL, GRAD_TOL = 2e-5, 1e-4


def sequence_mesh(shards, **others):
    return make_mesh({"data": 1, "fsdp": 1, "sequence": shards, "tensor": 1, **others},
                     jax.devices()[:shards * int(np.prod(list(others.values()) or [1]))])


# (mode, layout, shards, gates): every mode at least once, every shard count, both layouts, extreme gates.
CASES = [
    ("chunked", "multihead", 2, "mixed"),
    ("chunked", "multihead", 8, "near_one"),
    ("scan", "multihead", 4, "mixed"),
    ("recurrent", "multihead", 4, "near_zero"),
    ("attention", "multihead", 4, "mixed"),
    ("pallas", "multihead", 2, "mixed"),
    ("scan", "maxheaded", 8, "mixed"),
    ("chunked", "maxheaded", 4, "near_one"),
    ("recurrent", "maxheaded", 2, "mixed"),
    ("pallas", "maxheaded", 4, "mixed"),
]


@pytest.mark.parametrize("mode,layout,shards,gates", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_op_matches_oracle(mode, layout, shards, gates):
    rng = np.random.default_rng(SEED)
    # 24 positions: 3 per shard at 8 shards (odd), and chunk_size 2 leaves a padded chunk in every odd-length shard.
    q, k, v, log_r, theta, h0 = make_inputs(rng, t=24, gates=gates, with_state=True, **LAYOUTS[layout])
    dy = rng.normal(size=v.shape)
    mesh = sequence_mesh(shards)
    chunk_size = 2 if mode == "chunked" else None

    @jax.jit
    def forward_and_grads(q, k, v, log_r, theta, h0, dy):
        def f(q, k, v, log_r, theta, h0):
            return gateloop_context_parallel(q, k, v, PolarTransition(log_r, theta), mesh=mesh, mode=mode,
                                             initial_state=h0, return_state=True, chunk_size=chunk_size)

        (y, final), vjp = jax.vjp(f, q, k, v, log_r, theta, h0)
        return y, final, vjp((dy, jnp.zeros_like(final)))

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    y, final, grads = forward_and_grads(*map(f32, (q, k, v, log_r, theta)), jnp.asarray(h0, jnp.complex64), f32(dy))
    y_ref, states_ref = gateloop_forward(q, k, v, log_r, theta, h0)
    grads_ref = gateloop_backward(q, k, v, log_r, theta, h0, dy)
    msg = f"seed={SEED}"
    assert max_rel_error(y, y_ref) < FWD_TOL, msg
    final, final_ref = np.asarray(final), states_ref[:, -1]
    assert max_rel_error(final.real, final_ref.real) < FWD_TOL, msg
    assert max_rel_error(final.imag, final_ref.imag) < FWD_TOL, msg
    for name, g, ref in zip(("q", "k", "v", "log_r", "theta"), grads[:5], grads_ref[:5]):
        assert max_rel_error(g, ref) < GRAD_TOL, f"d{name}: {msg}"
    # JAX's cotangent of a complex input is the conjugate of the oracle's dL/dRe + i dL/dIm.
    dh0 = np.conj(np.asarray(grads[5]))
    assert max_rel_error(dh0.real, grads_ref[5].real) < GRAD_TOL, msg
    assert max_rel_error(dh0.imag, grads_ref[5].imag) < GRAD_TOL, msg


def test_length_not_divisible_is_one_clear_error():
    q = jnp.zeros((1, 10, 2, 4))
    a = PolarTransition(jnp.zeros_like(q), jnp.zeros_like(q))
    with pytest.raises(ValueError, match=r"length 10 is not divisible by the sequence axis size 4"):
        gateloop_context_parallel(q, q, q, a, mesh=sequence_mesh(4), mode="chunked")


def test_trainer_rejects_seq_len_not_divisible_by_mesh_sequence():
    from train_test import get_config

    from gateloop_jax.train import validate

    c = get_config()
    c.data.seq_len = 66
    c.mesh.update(data=1, sequence=4)
    with pytest.raises(ValueError, match=r"data.seq_len=66 is not divisible by mesh.sequence=4"):
        validate(c)


def _lm_loss_and_grads(model, tokens, mode):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens, mode=mode)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("name,mode", [("gateloop", "chunked"), ("transformer", None)])
def test_model_under_sequence_mesh_matches_one_device(name, mode, monkeypatch):
    """The LM (GateLoop multi-head, and the Transformer's context-parallel attention) with the length split 4 ways
    over the trainer's mesh and rules: logits and parameter gradients equal the one-device run."""
    # remat: the train step's jax.checkpoint around each block, with the shard_map inside.
    model = build_model(preset_config("test", name=name, d_model=16, num_heads=2, d_qk=4, d_v=4, num_layers=1,
                                      vocab_size=11, remat=True), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 11)
    (loss, logits), grads = _lm_loss_and_grads(model, tokens, mode)
    calls = []
    for fn in ("gateloop", "causal_attention"):
        original = getattr(context_parallel, fn)
        monkeypatch.setattr(context_parallel, fn, lambda *a, _f=original, **kw: calls.append(1) or _f(*a, **kw))
    with jax.set_mesh(sequence_mesh(4, data=2)), nnx.logical_axis_rules(DEFAULT_RULES):
        (loss_s, logits_s), grads_s = _lm_loss_and_grads(model, tokens, mode)
    assert calls, "the mixer did not take the context-parallel path"
    # Float32 sums reordered by the split (~1e-7 relative); parameter gradients compared to their own scale.
    np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for g, g_s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(g_s, g, rtol=0, atol=2e-5 * float(np.max(np.abs(g))))


def test_prefill_hands_the_last_shards_state_to_decoding():
    """A prefill split in 4 returns one (b, h, k, v) state per layer, the whole prompt's; generate(mesh=...) decodes
    from it the tokens of the one-device run (prompts of 7 and 5 tokens: right padded to 8, masked out)."""
    model = build_model(preset_config("test", name="gateloop", d_model=16, num_heads=2, d_qk=4, d_v=4, num_layers=1,
                                      vocab_size=11), rngs=nnx.Rngs(0))
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3, 1, 4, 1, 5]]
    tokens = jnp.asarray([p + [0] * (8 - len(p)) for p in prompts])
    mask = tokens > 0
    prefill = jax.jit(lambda t, m: model.prefill(t, mask=m, mode="chunked")[1])
    cache = prefill(tokens, mask)
    mesh = sequence_mesh(4)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        cache_s = prefill(tokens, mask)
    for state, state_s in zip(cache, cache_s):
        assert state_s.shape == state.shape
        np.testing.assert_allclose(state_s, state, rtol=1e-5, atol=1e-5)
    out = gateloop_jax.generate(model, prompts, 4, temperature=0, mode="chunked")
    out_s = gateloop_jax.generate(model, prompts, 4, temperature=0, mode="chunked", mesh=mesh)
    np.testing.assert_array_equal(out_s, out)


def test_training_sequence4_matches_data4(tmp_path, monkeypatch):
    """Three optimizer steps of the memory-horizon test config with mesh data=1 sequence=4 give the losses of data=4
    (rtol as tests/train_test.py: reduction orders differ in the last bits)."""
    from train_test import losses, tiny

    from gateloop_jax.train import train_and_evaluate

    calls = []
    original = context_parallel.gateloop
    monkeypatch.setattr(context_parallel, "gateloop", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    runs = []
    for i, mesh in enumerate([dict(data=4), dict(data=1, sequence=4)]):
        c = tiny(**mesh)
        train_and_evaluate(c, str(tmp_path / str(i)))
        runs.append(losses(str(tmp_path / str(i))))
    assert calls, "the sequence=4 run did not take the context-parallel path"
    assert len(runs[0]) == 3 and np.all(np.isfinite(runs[0]))
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4, atol=0)


def test_bench_context_parallel_tiny(tmp_path):
    """experiments/bench_context_parallel.py at test size: it trains with the length split in 4 and finds the state
    exchange among the step's collectives (one all-gather per GateLoop layer, forward)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
    import bench_context_parallel

    result = bench_context_parallel.main(["--out", str(tmp_path), "--models", "gateloop:test", "--sequence", "4",
                                          "--length", "16", "--batch", "2", "--layers", "1", "--mode", "chunked",
                                          "--reps", "1", "--warmup", "1"])
    (rec,) = result["records"]
    assert "skipped" not in rec, rec.get("skipped")
    assert rec["tokens_per_s"] > 0 and np.isfinite(rec["loss_last"])
    assert rec["mesh"]["sequence"] == 4 and rec["collectives"]["all-gather"]["ops"] >= 1
