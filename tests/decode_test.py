"""Generation (gateloop_jax.generate), the sample CLI and the transition inspection.

Parity: greedy decoding (parallel prefill, then the O(1) recurrent step / the KV cache) picks the argmax of the full
parallel forward of the same sequence at every generated position, for batched prompts of different lengths.
Tolerance: decode and full forward differ by float32 rounding (~1e-6 of the logit scale), so a generated token must
be the full forward's argmax up to a logit gap of 1e-4 (a near-tie may legitimately resolve either way).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gateloop_jax
from gateloop_jax import inspection
from gateloop_jax.decode import Sampler, pad_prompts
from gateloop_jax.models import build_model, preset_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
# Prompts of different lengths, one of length 1.
PROMPTS = [[5, 17, 3, 9, 60], [1], [40, 41, 42, 43, 44, 45, 46, 47]]
NEW = 6


def tiny_model(name):
    # Untied head: a random model with tied embeddings just repeats its last token, which would make parity trivial.
    # The hybrid needs two layers (one of each kind).
    return build_model(preset_config("test", name=name, vocab_size=VOCAB, num_layers=2 if name == "hybrid" else 1,
                                     tie_embeddings=False), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module", params=["gateloop", "transformer"])
def model(request):
    return tiny_model(request.param)


def prefill_mode(model):
    # A parallel mode for GateLoop's prefill (the model's default here is the sequential "recurrent").
    return "chunked" if model.config.name == "gateloop" else None


@pytest.fixture(scope="module", params=["gateloop", "transformer", "hybrid"])
def any_model(request):
    return tiny_model(request.param)


def test_greedy_equals_argmax_of_the_full_forward(any_model):
    model = any_model
    out = np.asarray(gateloop_jax.generate(model, PROMPTS, NEW, temperature=0, mode=prefill_mode(model)))
    assert out.shape == (len(PROMPTS), NEW) and out.dtype == np.int32
    # One right-padded batch of prompt + generated (padding is causally invisible to the real positions).
    sequences, _ = pad_prompts([p + g.tolist() for p, g in zip(PROMPTS, out)])
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(sequences)))
    for prompt, generated, row in zip(PROMPTS, out, full):
        logits = row[len(prompt) - 1:len(prompt) - 1 + NEW]  # position len-1+i predicts generated[i]
        chosen = np.take_along_axis(logits, generated[:, None], -1)[:, 0]
        np.testing.assert_array_less(logits.max(-1) - chosen, 1e-4, err_msg=f"prompt {prompt}: {generated}")
    # The random model does not just repeat one token (the check above would then be weak).
    assert len(np.unique(out)) > 3


def test_padded_array_prompt_equals_list_prompt(model):
    tokens, mask = pad_prompts(PROMPTS)
    from_list = gateloop_jax.generate(model, PROMPTS, NEW, temperature=0, mode=prefill_mode(model))
    # Garbage in the padding must not matter.
    tokens = np.where(mask, tokens, 7)
    from_array = gateloop_jax.generate(model, tokens, NEW, temperature=0, prompt_mask=mask, mode=prefill_mode(model))
    np.testing.assert_array_equal(from_array, from_list)


def test_sampling_is_deterministic_given_the_seed(model):
    kw = dict(temperature=1.0, mode=prefill_mode(model))
    a = np.asarray(gateloop_jax.generate(model, PROMPTS, NEW, seed=3, **kw))
    b = np.asarray(gateloop_jax.generate(model, PROMPTS, NEW, seed=3, **kw))
    c = np.asarray(gateloop_jax.generate(model, PROMPTS, NEW, seed=4, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    greedy = gateloop_jax.generate(model, PROMPTS, NEW, temperature=0, mode=prefill_mode(model))
    np.testing.assert_array_equal(
        gateloop_jax.generate(model, PROMPTS, NEW, top_k=1, seed=1, mode=prefill_mode(model)), greedy)
    np.testing.assert_array_equal(
        gateloop_jax.generate(model, PROMPTS, NEW, top_p=1e-6, seed=1, mode=prefill_mode(model)), greedy)


def test_callback_streams_every_step(model):
    seen = []
    out = gateloop_jax.generate(model, PROMPTS, NEW, temperature=0, mode=prefill_mode(model),
                                callback=lambda step, tokens: seen.append((step, tokens.copy())))
    assert [s for s, _ in seen] == list(range(NEW))
    np.testing.assert_array_equal(np.stack([t for _, t in seen], axis=1), out)


def test_sampler_filters():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.3, 0.2, 0.05]] * 4000))
    keys = jax.random.key(0)

    def freq(sampler):
        return np.bincount(np.asarray(sampler(logits, keys)), minlength=5) / logits.shape[0]

    np.testing.assert_array_equal(freq(Sampler(top_k=2))[[0, 3, 4]], 0)
    # Nucleus 0.6: 0.4 alone is below, 0.4 + 0.3 reaches it -> tokens 1 and 2, renormalised to 4/7, 3/7.
    f = freq(Sampler(top_p=0.6))
    np.testing.assert_array_equal(f[[0, 3, 4]], 0)
    np.testing.assert_allclose(f[1], 4 / 7, atol=0.03)
    # Temperature -> 0 approaches greedy; a high temperature flattens.
    assert freq(Sampler(temperature=1e-3))[1] == 1
    assert freq(Sampler(temperature=100.0))[0] > 0.15
    with pytest.raises(ValueError, match="temperature"):
        Sampler(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        Sampler(top_p=0)


def test_prompt_errors():
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[1, 2], []])
    with pytest.raises(ValueError, match="prefix"):
        pad_prompts(np.ones((1, 3), np.int32), np.array([[False, True, True]]))


# -- inspection ------------------------------------------------------------------------------------------------------

def test_transitions_and_plot(tmp_path):
    gateloop = tiny_model("gateloop")
    tokens = np.asarray([PROMPTS[2], PROMPTS[2][::-1]])
    layers = inspection.transitions(gateloop, tokens)
    (log_r, phase), = nnx.jit(lambda m, x: m.transitions(x))(gateloop, jnp.asarray(tokens))
    c = gateloop.config
    assert len(layers) == 1 and layers[0]["magnitude"].shape == (2, 8, c.num_heads * c.head_dims[0])
    np.testing.assert_allclose(layers[0]["magnitude"], np.exp(np.asarray(log_r)).reshape(2, 8, -1), rtol=1e-6)
    np.testing.assert_array_equal(layers[0]["phase"], np.asarray(phase).reshape(2, 8, -1))
    assert np.all((layers[0]["magnitude"] >= 0) & (layers[0]["magnitude"] <= 1))
    path = tmp_path / "t.png"
    fig = inspection.plot_transitions(gateloop, tokens[0], path=str(path), token_labels=[str(t) for t in tokens[0]],
                                      mark={"RESET": 44})
    assert path.stat().st_size > 1000 and len(fig.axes) == 4  # |a|, phase and their colour bars
    summary = inspection.summary_by_token(gateloop, tokens)
    assert summary[44]["count"] == 2 and 0 <= summary[44]["magnitude"] <= 1
    with pytest.raises(ValueError, match="no state transitions"):
        inspection.transitions(tiny_model("transformer"), tokens)


# -- on a trained checkpoint ----------------------------------------------------------------------------------------

def train_tiny(workdir):
    """A memory_horizon checkpoint at the trainer's test size (2 steps): what the CLI and the notebook load."""
    from train_test import get_config  # the trainer's tests' config loader

    from gateloop_jax.train import train_and_evaluate

    c = get_config("memory_horizon", "test")
    c.mesh.update(data=1, fsdp=1, tensor=1)
    train_and_evaluate(c, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("tiny_memory_horizon"))


def test_sample_cli(trained):
    cmd = [sys.executable, "-m", "gateloop_jax.sample", "--workdir", str(trained), "--prompt", "3 4 11",
           "--prompt", "1 10 2 5 11", "--max_new_tokens", "3", "--temperature", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "prompt: '3 4 11'   [3 4 Q]" and lines[2] == "prompt: '1 10 2 5 11'   [1 R 2 5 Q]"
    # The CLI prints what generate returns.
    model, _, _ = gateloop_jax.load(str(trained))
    expected = np.asarray(gateloop_jax.generate(model, [[3, 4, 11], [1, 10, 2, 5, 11]], 3, temperature=0))
    assert lines[1].split(":")[1].split() == [str(t) for t in expected[0]]
    assert lines[3].split(":")[1].split() == [str(t) for t in expected[1]]


def test_sample_cli_parses_token_ids():
    from gateloop_jax.errors import ConfigError
    from gateloop_jax.sample import parse_ids

    assert parse_ids(" 3 4  11 ", 12) == [3, 4, 11]
    with pytest.raises(ConfigError, match="space-separated token ids"):
        parse_ids("three four", 12)
    with pytest.raises(ConfigError, match=r"in \[0, 12\)"):
        parse_ids("3 12", 12)
