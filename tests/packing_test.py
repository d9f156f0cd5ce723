"""Packed documents: segment_ids through every registered model, the prefill/decode and the train/eval steps.

A packed row gives, position by position, the logits each segment gives run on its own (the GateLoop state and
phase restart, attention stays inside the segment, RoPE positions restart); decoding after a packed prefill continues
the row's last segment.
Tolerance: the packed and the separate runs compute the same float32 function with different shapes (reduction and
scan orders), so they agree to float32 rounding: atol=1e-5 of the logit scale, rtol=0 (as models_test's mode parity).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gateloop_jax import layers
from gateloop_jax.models import MODELS, build_model, preset_config
from gateloop_jax.train.steps import ModelParts, TrainState, make_eval_step, make_train_step

VOCAB = 64
# Two packed rows of length 16. Row 0: segments of 5, 1 and 10 tokens whose ids repeat non-adjacently (7, 3, 7): a
# new segment starts wherever the id changes, so its first and last segments are still separate. Row 1: a boundary at
# position 1 and a long last segment.
SEGMENT_IDS = np.array([[7] * 5 + [3] + [7] * 10,
                        [0] + [1] * 15], np.int32)


def modes_for(name):
    """The GateLoop modes each model is checked in: for "gateloop" a sequential, a log-depth and a chunked one (every
    mode against the oracle is tests/segments_test.py's job); the others in "chunked", the CPU default multi-head."""
    if MODELS[name][0] is layers.CausalSelfAttention:
        return [None]
    return ["recurrent", "scan", "chunked"] if name == "gateloop" else ["chunked"]


def tiny(name, **overrides):
    # Untied head, so that the logits depend on more than the last token's embedding.
    return build_model(preset_config("test", name=name, vocab_size=VOCAB, tie_embeddings=False, **overrides),
                       rngs=nnx.Rngs(0))


# GateLoop with a short convolution besides every registered model: its taps must not reach across a boundary either.
CONV = {"short_conv_size": 3}
CASES = [(name, {}) for name in sorted(MODELS)] + [("gateloop", CONV)]
CASE_IDS = sorted(MODELS) + ["gateloop_short_conv"]


def segments(row):
    """[(start, end)] of the segments of one row of SEGMENT_IDS."""
    starts = np.flatnonzero(np.asarray(layers.segment_positions(jnp.asarray(SEGMENT_IDS)))[row] == 0)
    return list(zip(starts, list(starts[1:]) + [SEGMENT_IDS.shape[1]]))


def tokens(seed):
    return jax.random.randint(jax.random.key(seed), SEGMENT_IDS.shape, 0, VOCAB)


# Jitted once per model and shape: op-by-op dispatch would compile every primitive of the model on first use.
@nnx.jit(static_argnames=("mode",))
def forward(model, tokens, segment_ids=None, *, mode=None):
    return model(tokens, mode=mode, segment_ids=segment_ids)


@nnx.jit(static_argnames=("mode", "max_len"))
def prefill(model, tokens, mask, segment_ids, *, mode, max_len):
    return model.prefill(tokens, mask=mask, mode=mode, max_len=max_len, segment_ids=segment_ids)


def unpack(batch, length):
    """Each segment of SEGMENT_IDS alone in its own row, right padded with zeros to `length` (a causal model's logits
    at the real positions do not see the padding), and the (row, start, end) it came from."""
    spans = [(row, start, min(end, length)) for row in range(batch.shape[0]) for start, end in segments(row)]
    out = np.zeros((len(spans), length), np.asarray(batch).dtype)
    for i, (row, start, end) in enumerate(spans):
        out[i, :end - start] = np.asarray(batch)[row, start:end]
    return out, spans


def test_segment_helpers():
    ids = jnp.asarray(SEGMENT_IDS)
    np.testing.assert_array_equal(layers.segment_positions(ids)[0], list(range(5)) + [0] + list(range(10)))
    np.testing.assert_array_equal(layers.segment_positions(ids)[1], [0] + list(range(15)))
    same = np.asarray(layers.same_segment(ids))
    assert same[0, 0, 4] and not same[0, 0, 5] and not same[0, 0, 6] and same[0, 6, 15]  # ids 7 | 3 | 7 stay apart
    assert segments(0) == [(0, 5), (5, 6), (6, 16)] and segments(1) == [(0, 1), (1, 16)]


@pytest.mark.parametrize("name, overrides", CASES, ids=CASE_IDS)
def test_packed_row_equals_each_segment_alone(name, overrides):
    model = tiny(name, **overrides)
    batch = tokens(1)
    rows, spans = unpack(batch, batch.shape[1])
    # The packed batch padded with empty rows to the unpacked one's shape: the packed calls below compile once.
    batch = jnp.concatenate([batch, jnp.zeros((len(spans) - 2, batch.shape[1]), batch.dtype)])
    segment_ids = np.concatenate([SEGMENT_IDS, np.zeros((len(spans) - 2, batch.shape[1]), np.int32)])
    for mode in modes_for(name):
        packed = np.asarray(forward(model, batch, jnp.asarray(segment_ids), mode=mode))
        alone = np.asarray(forward(model, jnp.asarray(rows), mode=mode))
        scale = float(np.max(np.abs(packed)))
        for i, (row, start, end) in enumerate(spans):
            np.testing.assert_allclose(packed[row, start:end], alone[i, :end - start], rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{name} mode={mode} row {row} segment [{start}, {end})")
    # The boundaries matter: without segment_ids the later segments read the earlier ones.
    unpacked = np.asarray(forward(model, batch, jnp.zeros_like(segment_ids), mode=modes_for(name)[0]))
    assert np.max(np.abs(unpacked[0, 6:] - packed[0, 6:])) > 1e-3 * scale


@pytest.mark.parametrize("name, overrides", [("gateloop", {}), ("transformer", {}), ("hybrid", {}),
                                             ("gateloop", CONV)], ids=["gateloop", "transformer", "hybrid",
                                                                        "gateloop_short_conv"])
def test_decoding_after_a_packed_prefill_continues_the_last_segment(name, overrides):
    """Right-padded prompts (lengths 9 and 12) packed as [document | start of the last one]; decoding then matches
    the full forward of the last document alone (with a short convolution, its history restarts with the segment)."""
    model = tiny(name, **overrides)
    seq = tokens(2)
    lengths = np.array([9, 12])
    mask = jnp.arange(12)[None, :] < jnp.asarray(lengths)[:, None]
    # Row 0 ends in its third segment (from 6), row 1 in its second; padding carries an id of its own (99), which
    # must not start a segment that decoding would then continue.
    segment_ids = jnp.where(mask, jnp.asarray(SEGMENT_IDS[:, :12]), 99)
    last_start = np.array([6, 1])
    mode = modes_for(name)[0]
    _, cache = prefill(model, jnp.where(mask, seq[:, :12], 0), mask, segment_ids, mode=mode, max_len=16)
    step = nnx.jit(lambda model, token, cache: model.decode_step(token, cache))
    # The last documents alone, right padded into one batch.
    last = np.zeros((2, 16), np.int32)
    for row in range(2):
        last[row, :16 - last_start[row]] = seq[row, last_start[row]:]
    last_alone = np.asarray(forward(model, jnp.asarray(last), mode=mode))
    for row in range(2):
        alone = last_alone[row]
        scale = float(np.max(np.abs(alone)))
        row_cache = jax.tree.map(lambda x, r=row: x[r:r + 1], cache)
        for i in range(16 - lengths[row]):
            position = lengths[row] + i
            logits, row_cache = step(model, seq[row:row + 1, position], row_cache)
            np.testing.assert_allclose(logits[0], alone[position - last_start[row]], rtol=0, atol=1e-5 * scale,
                                       err_msg=f"{name} row {row} decode step {i}")


def test_segment_ids_shape_is_checked():
    model = tiny("gateloop")
    with pytest.raises(ValueError, match=r"segment_ids has shape \(2, 15\), expected the tokens' shape \(2, 16\)"):
        model(tokens(3), segment_ids=jnp.asarray(SEGMENT_IDS[:, :15]))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        model(tokens(3), segment_ids=jnp.asarray(SEGMENT_IDS, jnp.float32))


def test_train_and_eval_steps_use_the_batch_segment_ids():
    """One optimizer step on a packed batch equals the step on the same documents unpacked into right-padded rows
    (loss, then every updated parameter), and eval sums agree; with one segment per row the loss differs.
    The hybrid has both kinds of blocks. Both batches have the same shapes, so each step compiles once."""
    name = "hybrid"
    model = tiny(name)
    parts, params = ModelParts.split(model)
    tx = optax.sgd(0.1)
    mode = modes_for(name)[0]
    train_step = jax.jit(make_train_step(parts, tx, lambda _: 0.1, grad_accum_steps=1, seed=0, mode=mode))
    eval_step = jax.jit(make_eval_step(parts, mode=mode))
    seq = np.asarray(tokens(4))
    # Two packed rows, then three empty (masked) ones so that both batches have 5 rows.
    packed = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": np.ones((2, 15), np.float32),
              "segment_ids": SEGMENT_IDS[:, :-1]}
    # The same documents one per row, right padded (the mask drops the padding from the loss); one segment per row.
    rows = {key: unpack(value, 15)[0] for key, value in packed.items()}
    rows["segment_ids"] = np.zeros_like(rows["segment_ids"])
    packed = {key: np.concatenate([value, np.zeros((3, 15), value.dtype)]) for key, value in packed.items()}
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    new_packed, m_packed = train_step(state, packed)
    new_rows, m_rows = train_step(state, rows)
    np.testing.assert_allclose(m_packed["train/loss"], m_rows["train/loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_packed.params), jax.tree.leaves(new_rows.params)):
        # Gradients are sums over 30 tokens in different orders: float32 rounding relative to each tensor's scale.
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(np.max(np.abs(b))))
    s_packed, s_rows = eval_step(params, packed), eval_step(params, rows)
    np.testing.assert_allclose(s_packed["nll"], s_rows["nll"], rtol=1e-5)
    assert float(s_packed["count"]) == float(s_rows["count"]) == 30
    without = {**packed, "segment_ids": np.zeros_like(packed["segment_ids"])}
    assert abs(float(train_step(state, without)[1]["train/loss"]) - float(m_packed["train/loss"])) > 1e-4
