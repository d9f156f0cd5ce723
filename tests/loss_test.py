"""The chunked loss equals the plain one (value and gradient) and never holds the (b, t, V) logits; the trainer picks
it by vocabulary size.

Tolerances: the chunked loss runs the same float32 operations on the same values, only summed chunk by chunk, so it
differs from the plain loss by float32 summation order: rtol=1e-5 on sums of ~100 terms of size ~log V. Against the
float64 NumPy oracle (log-softmax of the same logits) the float32 log-softmax adds ~1e-7 relative per term: rtol=1e-5.
Gradients: the backward recomputes each chunk's logits with the same operations; rtol=1e-5, atol=1e-6 (atol for
entries that cancel to ~0, whose float32 rounding is ~1e-8 of the largest entries).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gateloop_jax.models import build_model, preset_config
from gateloop_jax.train import loss as loss_lib


def _model(vocab, tie):
    config = preset_config("test", vocab_size=vocab, d_model=16, num_layers=1, num_heads=2, mode="recurrent",
                           tie_embeddings=tie)
    return build_model(config, rngs=nnx.Rngs(0))


def _batch(vocab, b, t, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
    targets = rng.integers(0, vocab, (b, t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.8).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(mask)


def _oracle_nll(logits, targets, mask):
    x = np.asarray(logits, np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
    return float((nll * np.asarray(mask, np.float64)).sum())


@pytest.mark.parametrize("t,chunk,tie", [(7, 3, True), (12, 4, False), (1, 4, True)],
                         ids=["odd_padded_tied", "even_untied", "t1"])
def test_chunked_equals_plain_loss_and_gradient(t, chunk, tie):
    vocab = 50
    model = _model(vocab, tie)
    tokens, targets, mask = _batch(vocab, 2, t)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @functools.partial(jax.jit, static_argnums=1)
    def stats_and_grads(p, chunk_size):
        def nll(p):
            stats = loss_lib.model_token_stats(nnx.merge(graphdef, p, rest), tokens, targets, mask,
                                               chunk_size=chunk_size)
            return stats["nll"], stats

        return jax.grad(nll, has_aux=True)(p)[::-1]

    (plain, grad_plain), (chunked, grad_chunked) = stats_and_grads(params, 0), stats_and_grads(params, chunk)
    oracle = _oracle_nll(jax.jit(lambda p: nnx.merge(graphdef, p, rest)(tokens))(params), targets, mask)
    np.testing.assert_allclose(float(chunked["nll"]), oracle, rtol=1e-5)
    np.testing.assert_allclose(float(plain["nll"]), oracle, rtol=1e-5)
    assert float(chunked["count"]) == float(mask.sum())
    assert float(chunked["correct"]) == float(plain["correct"])

    flat_plain, flat_chunked = jax.tree.leaves(grad_plain), jax.tree.leaves(grad_chunked)
    assert len(flat_plain) == len(flat_chunked)
    assert any(float(jnp.abs(g).max()) > 0 for g in flat_plain)
    for a, b in zip(flat_plain, flat_chunked):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_the_full_logits():
    # XLA's own buffer assignment of the compiled gradient: the plain loss holds the (b, t, V) float32 logits and
    # their gradient (over 2 copies); the chunked one needs less temporary memory than one copy (what it holds is
    # (b, c, V) logits and (V, d) embedding-gradient sized buffers).
    vocab, b, t, chunk = 4096, 2, 64, 8
    model = _model(vocab, tie=True)
    tokens, targets, mask = _batch(vocab, b, t)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def temp_bytes(chunk_size):
        def f(p):
            return loss_lib.model_token_stats(nnx.merge(graphdef, p, rest), tokens, targets, mask,
                                              chunk_size=chunk_size)["nll"]
        return jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * vocab * 4
    plain, chunked = temp_bytes(0), temp_bytes(chunk)
    assert plain >= 2 * logits_bytes, (plain, logits_bytes)
    assert chunked < logits_bytes, (chunked, logits_bytes)


def test_chunk_size_for_threshold_and_bad_values():
    assert loss_lib.chunk_size_for(256, 8192, 32000) == 256
    assert loss_lib.chunk_size_for(256, 8192, 400) == 0
    assert loss_lib.chunk_size_for(0, 8192, 32000) == 0
    assert loss_lib.chunk_size_for(128, 0, 10) == 128
    with pytest.raises(ValueError, match=r"loss_chunk_size=-1 .* must be >= 0"):
        loss_lib.chunk_size_for(-1, 8192, 32000)


def test_trainer_with_the_chunked_loss_follows_the_plain_one(tmp_path, monkeypatch):
    from gateloop_jax.train import train_and_evaluate
    from train_test import losses, tiny

    traced_chunks = []
    chunked_token_stats = loss_lib.chunked_token_stats

    def spy(*args, chunk_size, **kwargs):
        traced_chunks.append(chunk_size)
        return chunked_token_stats(*args, chunk_size=chunk_size, **kwargs)

    monkeypatch.setattr(loss_lib, "chunked_token_stats", spy)

    def run(name, **loss):
        c = tiny(steps=2)
        c.update(loss)
        c.eval_every_steps = 2
        train_and_evaluate(c, str(tmp_path / name))
        return losses(str(tmp_path / name))

    plain = run("plain", loss_chunk_size=0)
    assert traced_chunks == []
    chunked = run("chunked", loss_chunk_size=4, chunked_loss_min_vocab=0)
    assert traced_chunks == [4, 4]  # traced once by the train step, once by the eval step
    # Two optimizer steps from the same start: the chunked loss's gradients differ by float32 summation order only,
    # which Adam (eps=1e-4 in tiny()) carries into step 2's loss at ~1e-6 relative.
    np.testing.assert_allclose(chunked, plain, rtol=1e-5)
    with pytest.raises(ValueError, match=r"loss_chunk_size=-1"):
        run("bad", loss_chunk_size=-1)
