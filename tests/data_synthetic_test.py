"""Synthetic tasks: targets against plain-loop implementations of the documented rules, determinism, resume."""

import json
import time

import numpy as np
import pytest

from gateloop_jax import data
from gateloop_jax.data import synthetic


def batch(name, seed=0, index=0, batch_size=16, **overrides):
    config = data.default_config(name)
    config.update(overrides)
    return config, synthetic.global_batch(config, batch_size=batch_size, seed=seed, index=index)


def check_shapes(config, b, batch_size):
    for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("mask", np.float32)):
        assert b[key].shape == (batch_size, config.seq_len) and b[key].dtype == dtype
    assert 0 <= b["inputs"].min() and b["inputs"].max() < data.vocab_size(config)
    assert 0 <= b["targets"].min() and b["targets"].max() < data.vocab_size(config)
    assert not b["targets"][b["mask"] == 0].any()


# --- the documented rules, one position at a time ---------------------------------------------------------


def memory_horizon_reference(inputs, num_digits, modulus):
    reset, query = max(num_digits, modulus), max(num_digits, modulus) + 1
    targets, mask = [], []
    total = 0
    for token in inputs:
        if token == reset:
            total = 0
        elif token != query:
            assert 0 <= token < num_digits
            total += token
        targets.append(total % modulus if token == query else 0)
        mask.append(1.0 if token == query else 0.0)
    return targets, mask


@pytest.mark.parametrize(
    "knobs",
    [{}, {"num_digits": 4, "modulus": 7, "reset_prob": 0.3, "query_prob": 0.5, "seq_len": 33}, {"reset_prob": 0.0}],
)
def test_memory_horizon_matches_reference(knobs):
    config, b = batch("memory_horizon", seed=7, index=3, **knobs)
    check_shapes(config, b, 16)
    for row in range(16):
        targets, mask = memory_horizon_reference(list(b["inputs"][row]), config.num_digits, config.modulus)
        assert list(b["targets"][row]) == targets and list(b["mask"][row]) == mask
    # Token frequencies follow the knobs (loose bounds: 16 * t draws).
    ids = synthetic.memory_horizon_vocab(config.num_digits, config.modulus)
    assert abs((b["inputs"] == ids["query"]).mean() - config.query_prob) < 0.06
    assert abs((b["inputs"] == ids["reset"]).mean() - config.reset_prob) < 0.06


def test_memory_horizon_default_vocabulary():
    config = data.default_config("memory_horizon")
    assert data.vocab_size(config) == 12  # digits 0-9, RESET 10, QUERY 11


def mqar_reference(inputs, num_kv_pairs, vocab_size):
    k, half = num_kv_pairs, vocab_size // 2
    bindings = {}
    for i in range(k):
        key, value = inputs[2 * i], inputs[2 * i + 1]
        assert 1 <= key < half <= value < vocab_size and key not in bindings
        bindings[key] = value
    assert len(set(bindings.values())) == k
    targets, mask, queried = [0] * (2 * k), [0.0] * (2 * k), []
    for token in inputs[2 * k :]:
        if token == 0:
            targets.append(0), mask.append(0.0)
        else:
            targets.append(bindings[token]), mask.append(1.0), queried.append(token)
    assert sorted(queried) == sorted(bindings)  # every key queried exactly once
    return targets, mask


@pytest.mark.parametrize("knobs", [{}, {"num_kv_pairs": 4, "vocab_size": 16, "seq_len": 12, "query_gaps": "uniform"}])
def test_mqar_matches_reference(knobs):
    config, b = batch("mqar", seed=1, index=2, **knobs)
    check_shapes(config, b, 16)
    for row in range(16):
        targets, mask = mqar_reference(list(b["inputs"][row]), config.num_kv_pairs, config.vocab_size)
        assert list(b["targets"][row]) == targets and list(b["mask"][row]) == mask


def selective_copy_reference(inputs, num_copy_tokens):
    context = len(inputs) - num_copy_tokens
    assert all(token == 1 for token in inputs[context:])  # COPY markers
    data_tokens = [token for token in inputs[:context] if token >= 2]
    assert len(data_tokens) == num_copy_tokens and all(token in (0,) or token >= 2 for token in inputs[:context])
    return [0] * context + data_tokens, [0.0] * context + [1.0] * num_copy_tokens


@pytest.mark.parametrize("knobs", [{}, {"num_copy_tokens": 5, "num_values": 3, "seq_len": 10}])
def test_selective_copy_matches_reference(knobs):
    config, b = batch("selective_copy", seed=2, index=5, **knobs)
    check_shapes(config, b, 16)
    for row in range(16):
        targets, mask = selective_copy_reference(list(b["inputs"][row]), config.num_copy_tokens)
        assert list(b["targets"][row]) == targets and list(b["mask"][row]) == mask


# --- several examples per row --------------------------------------------------------------------------------

REFERENCES = {
    "memory_horizon": lambda c, x: memory_horizon_reference(x, c.num_digits, c.modulus),
    "mqar": lambda c, x: mqar_reference(x, c.num_kv_pairs, c.vocab_size),
    "selective_copy": lambda c, x: selective_copy_reference(x, c.num_copy_tokens),
}
PACKED = {
    "memory_horizon": {"seq_len": 60},
    "mqar": {"num_kv_pairs": 2, "vocab_size": 16, "seq_len": 48},
    "selective_copy": {"num_copy_tokens": 3, "num_values": 4, "seq_len": 30},
}


@pytest.mark.parametrize("name", synthetic.TASKS)
@pytest.mark.parametrize("per_row", [2, 3])
def test_examples_per_row_packs_independent_examples(name, per_row):
    config, b = batch(name, seed=6, index=1, batch_size=4, examples_per_row=per_row, **PACKED[name])
    check_shapes(config, b, 4)
    length = config.seq_len // per_row
    assert b["segment_ids"].dtype == np.int32
    np.testing.assert_array_equal(b["segment_ids"], np.repeat(np.arange(1, per_row + 1), length)[None].repeat(4, 0))
    for row in range(4):
        for j in range(per_row):
            span = slice(j * length, (j + 1) * length)
            # Each segment follows the task's rule on its own, from its own start (a full example of `length`).
            targets, mask = REFERENCES[name](config, list(b["inputs"][row, span]))
            assert list(b["targets"][row, span]) == targets and list(b["mask"][row, span]) == mask
    # One example per row (the default) adds no segment_ids: the model runs unsegmented.
    assert "segment_ids" not in batch(name, **PACKED[name])[1]


def test_examples_per_row_must_divide_seq_len():
    config = data.default_config("memory_horizon")
    config.update(seq_len=64, examples_per_row=3)
    with pytest.raises(ValueError, match=r"data.examples_per_row=3 must be >= 1 and divide data.seq_len=64"):
        data.vocab_size(config)
    # The task's own limits apply to the example length, and are checked before any batch is drawn.
    config = data.default_config("mqar")
    config.update(seq_len=64, num_kv_pairs=5, examples_per_row=4)
    with pytest.raises(ValueError, match=r"got seq_len=16, num_kv_pairs=5.*examples_per_row = 16 positions"):
        data.vocab_size(config)


# --- determinism, sharding, resume, speed ------------------------------------------------------------------


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_deterministic_by_seed_and_index(name):
    _, a = batch(name, seed=4, index=9)
    _, b = batch(name, seed=4, index=9)
    _, c = batch(name, seed=4, index=10)
    _, d = batch(name, seed=5, index=9)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert (a["inputs"] != c["inputs"]).any() and (a["inputs"] != d["inputs"]).any()


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_iterator_resume_and_process_shards(name):
    config = data.default_config(name)
    it = data.train_iterator(config, global_batch_size=8, seed=3)
    first = [next(it) for _ in range(3)]
    np.testing.assert_array_equal(
        first[2]["inputs"], synthetic.global_batch(config, batch_size=8, seed=3, index=2)["inputs"]
    )
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    fresh = data.train_iterator(config, global_batch_size=8, seed=3)
    fresh.set_state(state)
    for e in expected:
        b = next(fresh)
        for key in e:
            np.testing.assert_array_equal(b[key], e[key])
    # Two processes' local batches stack to the one-process global batch.
    shards = [
        data.train_iterator(config, global_batch_size=8, seed=3, process_index=p, process_count=2) for p in range(2)
    ]
    for g in first:
        parts = [next(s) for s in shards]
        np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), g["inputs"])


@pytest.mark.parametrize("name", synthetic.TASKS)
def test_eval_set_is_fixed_and_apart_from_training(name):
    config = data.default_config(name)
    evals = data.eval_batches(config, split="validation", batch_size=8)
    first, second = list(evals), list(evals)
    assert len(first) == config.num_eval_batches
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    train = next(data.train_iterator(config, global_batch_size=8, seed=config.eval_seed))
    assert (train["inputs"] != first[0]["inputs"]).any()


def test_memory_horizon_is_fast():
    config = data.default_config("memory_horizon")
    config.seq_len = 128
    times = []
    for i in range(20):
        start = time.perf_counter()
        synthetic.global_batch(config, batch_size=64, seed=0, index=i)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.01


def test_bad_knobs():
    with pytest.raises(ValueError, match="reset_prob \\+ query_prob < 1"):
        batch("memory_horizon", reset_prob=0.5, query_prob=0.5)
    with pytest.raises(ValueError, match="seq_len >= 3 \\* num_kv_pairs"):
        batch("mqar", seq_len=20, num_kv_pairs=8, query_gaps="uniform")
    with pytest.raises(ValueError, match="seq_len >= 4 \\* num_kv_pairs"):
        batch("mqar", seq_len=20, num_kv_pairs=8)
    with pytest.raises(ValueError, match="seq_len >= 2 \\* num_copy_tokens"):
        batch("selective_copy", seq_len=20, num_copy_tokens=16)
    with pytest.raises(ValueError, match="unknown data name 'nope'"):
        data.default_config("nope")
    config = data.default_config("mqar")
    with pytest.raises(AttributeError, match="num_kv_pair"):  # locked: a typo is an error naming the key
        config.num_kv_pair = 3


def test_mqar_kv_pairs_mixture_trains_on_every_k_and_evaluates_at_num_kv_pairs():
    """min_num_kv_pairs=2 with K=8: training rows hold 2, 4 or 8 pairs (each row follows the documented rule at its
    own K, every K present); the evaluation set keeps K=8 in every row."""
    config = data.default_config("mqar")
    config.update(seq_len=64, num_kv_pairs=8, vocab_size=64, min_num_kv_pairs=2)
    assert synthetic.mqar_kv_pairs_mixture(8, 2) == (2, 4, 8) and synthetic.mqar_kv_pairs_mixture(8, 3) == (3, 6, 8)
    b = synthetic.global_batch(config, batch_size=64, seed=0, index=0)
    check_shapes(config, b, 64)
    row_k = b["mask"].sum(axis=1).astype(int)
    assert set(row_k) == {2, 4, 8}
    for row in range(64):
        targets, mask = mqar_reference(list(b["inputs"][row]), int(row_k[row]), config.vocab_size)
        assert list(b["targets"][row]) == targets and list(b["mask"][row]) == mask
    for evaluation in data.eval_batches(config, split="validation", batch_size=16):
        assert np.all(evaluation["mask"].sum(axis=1) == 8)
    config.min_num_kv_pairs = 9
    with pytest.raises(ValueError, match="min_num_kv_pairs=9 must be 0 .* num_kv_pairs=8"):
        data.vocab_size(config)
