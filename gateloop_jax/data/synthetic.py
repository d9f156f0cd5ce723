"""Synthetic sequence tasks, generated on the fly in NumPy: memory horizon, MQAR, selective copying.

Every generator is a pure function of a `np.random.Generator` and returns one batch

    {"inputs": int32 (b, t), "targets": int32 (b, t), "mask": float32 (b, t)}

where `targets[:, i]` is the label scored at position i (after reading inputs[:, :i+1]) and `mask` selects the
scored positions (unscored positions carry target 0). The tasks are labelling tasks, not next-token LM: the
trainer's masked cross-entropy is the same for both.

Determinism: `global_batch(task, config, seed, index)` draws batch `index` from a generator seeded by
(seed, stream, index), so batch n does not depend on batches 0..n-1 and resuming is just setting the index.
The global batch is generated whole and each process keeps its rows, so the data does not depend on the
number of processes.

Packing: with `examples_per_row` = m > 1, each row of t = seq_len positions holds m independent examples of
seq_len / m positions each (drawn as a batch of b * m examples), and the batch gains segment_ids int32 (b, t):
1, 2, ..., m for the examples, so the model starts afresh at each. Every task knob (e.g. mqar's seq_len >= 3K)
then applies to the example length seq_len / m.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import grain
import ml_collections
import numpy as np

from gateloop_jax.errors import ConfigError

Batch = dict[str, np.ndarray]

# Streams keep the training and evaluation draws apart even when a seed value is reused for both.
TRAIN_STREAM = 0
EVAL_STREAM = 1


def _batch(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> Batch:
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "mask": mask.astype(np.float32),
    }


def _random_subsets(rng: np.random.Generator, batch_size: int, population: int, k: int) -> np.ndarray:
    """k distinct integers from [0, population) per row, in uniformly random order. Shape (b, k)."""
    # The k smallest of i.i.d. uniforms are a uniform k-subset (argpartition: O(population), not a full sort);
    # an independent random permutation of them makes the order uniform too.
    subset = np.argpartition(rng.random((batch_size, population)), k - 1, axis=1)[:, :k]
    order = np.argsort(rng.random((batch_size, k)), axis=1)
    return np.take_along_axis(subset, order, axis=1)


def _weighted_subsets(rng: np.random.Generator, batch_size: int, weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices into `weights` per row, drawn without replacement with probability proportional to the
    weights (successive draws, as numpy's choice(replace=False, p=...)), in random order. Shape (b, k)."""
    # Exponential race (Efraimidis-Spirakis): the k smallest of E_i / w_i, E_i ~ Exp(1), are distributed as k
    # successive weighted draws without replacement; vectorised over the batch.
    keys = rng.exponential(size=(batch_size, weights.size)) / weights
    subset = np.argpartition(keys, k - 1, axis=1)[:, :k]
    order = np.argsort(rng.random((batch_size, k)), axis=1)
    return np.take_along_axis(subset, order, axis=1)


# ----------------------------------------------------------------------------------------------------------
# Memory horizon


def memory_horizon_vocab(num_digits: int, modulus: int) -> dict[str, int]:
    """Token ids of the memory-horizon task: digits/answers 0..n-1, then RESET, QUERY; n = max(num_digits, modulus)."""
    n = max(num_digits, modulus)
    return {"reset": n, "query": n + 1, "vocab_size": n + 2}


def memory_horizon(
    rng: np.random.Generator,
    batch_size: int,
    *,
    seq_len: int,
    num_digits: int = 10,
    modulus: int = 10,
    reset_prob: float = 0.1,
    query_prob: float = 0.2,
) -> Batch:
    """Memory horizon: running sum (mod `modulus`) of the digits since the last RESET, asked for at QUERY tokens.

    Vocabulary (n = max(num_digits, modulus)): ids 0..num_digits-1 are the digit tokens (value = id), ids
    0..modulus-1 are also the answers, RESET = n, QUERY = n + 1; vocab_size = n + 2 (10 digits: 0-9, RESET 10,
    QUERY 11, vocab 12).

    Sequence: t = seq_len positions, each drawn independently: RESET with probability `reset_prob`, QUERY with
    probability `query_prob`, otherwise a digit uniform in [0, num_digits). The sequence starts as if right
    after a RESET.

    Target rule: at a QUERY position i, target = (sum of the digit tokens strictly after the last RESET before
    i, or from the start if none) mod `modulus`, mask 1. Everywhere else target 0, mask 0. QUERY does not
    change the sum, RESET sets it to 0.

    Difficulty knobs: `reset_prob` sets the horizon the model must remember (segments are ~1/reset_prob long;
    a model that cannot forget on RESET keeps summing the whole prefix); `num_digits`, `modulus` the size of
    the state; `query_prob` the density of supervision; `seq_len` the longest possible segment.

    Returns: {"inputs", "targets", "mask"} of shape (b, t).
    """
    if reset_prob < 0 or query_prob <= 0 or reset_prob + query_prob >= 1:
        raise ValueError(
            f"memory_horizon needs reset_prob >= 0, query_prob > 0 and reset_prob + query_prob < 1, "
            f"got reset_prob={reset_prob}, query_prob={query_prob}"
        )
    ids = memory_horizon_vocab(num_digits, modulus)
    u = rng.random((batch_size, seq_len))
    digits = rng.integers(0, num_digits, size=(batch_size, seq_len))
    is_reset = u < reset_prob
    is_query = (u >= reset_prob) & (u < reset_prob + query_prob)
    inputs = np.where(is_reset, ids["reset"], np.where(is_query, ids["query"], digits))

    # Sum since the last reset = cumsum minus the cumsum at that reset. Digits are >= 0, so the cumsum is
    # non-decreasing and the running max of "cumsum at resets" is the cumsum at the latest reset.
    summed = np.cumsum(np.where(is_reset | is_query, 0, digits), axis=1)
    at_last_reset = np.maximum.accumulate(np.where(is_reset, summed, 0), axis=1)
    targets = np.where(is_query, (summed - at_last_reset) % modulus, 0)
    return _batch(inputs, targets, is_query)


# ----------------------------------------------------------------------------------------------------------
# Multi-query associative recall


MQAR_QUERY_GAPS = ("power_law", "uniform")


def mqar(
    rng: np.random.Generator,
    batch_size: int,
    *,
    seq_len: int,
    num_kv_pairs: int = 16,
    vocab_size: int = 8192,
    query_gaps: str = "power_law",
    power_a: float = 0.01,
) -> Batch:
    """Multi-query associative recall (Zoology-style): recall the value bound to a key seen earlier.

    Vocabulary: 0 = filler, keys from [1, vocab_size // 2), values from [vocab_size // 2, vocab_size) (disjoint
    ranges); the model's vocab_size is `vocab_size`.

    Sequence of t = seq_len positions, K = num_kv_pairs:
      positions 0..2K-1: k_1 v_1 k_2 v_2 ... k_K v_K, the K keys distinct and the K values distinct, each a
        uniform random subset in random order;
      positions 2K..t-1: filler 0 except K query positions, distinct, each holding one of the K keys (every key
        queried exactly once, in random order). Where the queries go (`query_gaps`):
        "power_law" (Zoology's protocol, its default power_a = 0.01): query slots 2K + 2g for gaps
          g in [0, (t - 2K) // 2), drawn without replacement with probability proportional to (g + 1)^(power_a - 1),
          so most queries come soon after the bindings and a few far away, as repeated bigrams do in text;
        "uniform": positions uniform in [2K, t), every distance equally likely (harder for recurrent models).
    Target rule: at a query position holding key k_j, target = v_j, mask 1; elsewhere target 0, mask 0.

    Difficulty knobs: `num_kv_pairs` (how many associations the state must hold), `seq_len` (distance between
    binding and query), `query_gaps` / `power_a` (how those distances are spread), `vocab_size`. Needs
    seq_len >= 3K (>= 4K for power_law, whose query slots are every other position), K < vocab_size // 2.

    Returns: {"inputs", "targets", "mask"} of shape (b, t).
    """
    k, half = num_kv_pairs, vocab_size // 2
    min_len = 4 * k if query_gaps == "power_law" else 3 * k
    if seq_len < min_len or k > half - 1:
        raise ValueError(
            f"mqar needs seq_len >= {min_len // k} * num_kv_pairs (query_gaps={query_gaps!r}) and "
            f"num_kv_pairs < vocab_size // 2, got seq_len={seq_len}, num_kv_pairs={num_kv_pairs}, "
            f"vocab_size={vocab_size}"
        )
    if query_gaps not in MQAR_QUERY_GAPS:
        raise ValueError(f"mqar: query_gaps={query_gaps!r} is not one of {MQAR_QUERY_GAPS}.")
    if query_gaps == "power_law" and not 0.0 < power_a <= 1.0:
        raise ValueError(f"mqar: power_a={power_a} must be in (0, 1] (1 = uniform gaps).")
    keys = _random_subsets(rng, batch_size, half - 1, k) + 1
    values = _random_subsets(rng, batch_size, vocab_size - half, k) + half
    if query_gaps == "uniform":
        query_pos = _random_subsets(rng, batch_size, seq_len - 2 * k, k) + 2 * k
    else:
        slots = (seq_len - 2 * k) // 2
        weights = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
        query_pos = 2 * k + 2 * _weighted_subsets(rng, batch_size, weights, k)

    inputs = np.zeros((batch_size, seq_len), np.int64)
    targets = np.zeros((batch_size, seq_len), np.int64)
    mask = np.zeros((batch_size, seq_len), bool)
    inputs[:, 0 : 2 * k : 2] = keys
    inputs[:, 1 : 2 * k : 2] = values
    rows = np.arange(batch_size)[:, None]
    inputs[rows, query_pos] = keys
    targets[rows, query_pos] = values
    mask[rows, query_pos] = True
    return _batch(inputs, targets, mask)


def mqar_kv_pairs_mixture(num_kv_pairs: int, min_num_kv_pairs: int) -> tuple[int, ...]:
    """The K values of mqar_mixture: min_num_kv_pairs doubled until num_kv_pairs (which is always included)."""
    ks, k = [], min_num_kv_pairs
    while k < num_kv_pairs:
        ks.append(k)
        k *= 2
    return tuple(ks) + (num_kv_pairs,)


def mqar_mixture(rng: np.random.Generator, batch_size: int, *, num_kv_pairs: int = 16, min_num_kv_pairs: int = 0,
                 **kwargs) -> Batch:
    """mqar rows whose K is drawn per row, equally often, from mqar_kv_pairs_mixture(num_kv_pairs, min_num_kv_pairs)
    (min_num_kv_pairs = 0: every row has num_kv_pairs pairs). Every row keeps the seq_len and the token format.

    Zoology's later MQAR protocol (the Based paper's) trains on such a mixture, K = 4 ... 64: the rows with few pairs
    teach the binding circuit quickly and it carries over to the large K. Trained on K = 16 alone, a 2-layer
    Transformer at L = 256 stays at accuracy 1/K for 20k steps on an H100, while at K = 4 it reaches 1.0
    (experiments/README.md, MQAR)."""
    if not min_num_kv_pairs:
        return mqar(rng, batch_size, num_kv_pairs=num_kv_pairs, **kwargs)
    if not 1 <= min_num_kv_pairs <= num_kv_pairs:
        raise ValueError(f"mqar: min_num_kv_pairs={min_num_kv_pairs} must be 0 (off) or in [1, num_kv_pairs="
                         f"{num_kv_pairs}].")
    ks = mqar_kv_pairs_mixture(num_kv_pairs, min_num_kv_pairs)
    row_k = rng.integers(0, len(ks), batch_size)
    parts = {}
    for i, k in enumerate(ks):
        rows = np.flatnonzero(row_k == i)
        if rows.size:
            parts[k] = (rows, mqar(rng, rows.size, num_kv_pairs=k, **kwargs))
    first = next(iter(parts.values()))[1]
    out = {name: np.zeros((batch_size,) + array.shape[1:], array.dtype) for name, array in first.items()}
    for rows, batch in parts.values():
        for name, array in batch.items():
            out[name][rows] = array
    return out


# ----------------------------------------------------------------------------------------------------------
# Selective copying


def selective_copy_vocab(num_values: int) -> dict[str, int]:
    """Token ids of selective copying: NOISE 0, COPY 1, data tokens 2..num_values+1."""
    return {"noise": 0, "copy": 1, "first_value": 2, "vocab_size": num_values + 2}


def selective_copy(
    rng: np.random.Generator,
    batch_size: int,
    *,
    seq_len: int,
    num_copy_tokens: int = 16,
    num_values: int = 16,
) -> Batch:
    """Selective copying (Mamba-style): reproduce, in order, the data tokens scattered among noise tokens.

    Vocabulary: 0 = NOISE, 1 = COPY, data tokens 2..num_values+1; vocab_size = num_values + 2.

    Sequence of t = seq_len positions, K = num_copy_tokens, context length c = t - K:
      positions 0..c-1: NOISE except K distinct positions (uniform random) holding data tokens drawn uniformly
        with replacement;
      positions c..t-1: COPY.
    Target rule: at position c + j (j = 0..K-1) target = the j-th data token of the context in position order,
    mask 1; elsewhere target 0, mask 0.

    Difficulty knobs: `seq_len` (how much noise to skip), `num_copy_tokens`, `num_values`. Needs c >= K.

    Returns: {"inputs", "targets", "mask"} of shape (b, t).
    """
    k = num_copy_tokens
    context = seq_len - k
    if context < k:
        raise ValueError(f"selective_copy needs seq_len >= 2 * num_copy_tokens, got {seq_len=}, {num_copy_tokens=}")
    ids = selective_copy_vocab(num_values)
    positions = np.sort(_random_subsets(rng, batch_size, context, k), axis=1)
    values = rng.integers(0, num_values, size=(batch_size, k)) + ids["first_value"]

    inputs = np.full((batch_size, seq_len), ids["noise"], np.int64)
    inputs[np.arange(batch_size)[:, None], positions] = values
    inputs[:, context:] = ids["copy"]
    targets = np.zeros((batch_size, seq_len), np.int64)
    targets[:, context:] = values
    mask = np.zeros((batch_size, seq_len), bool)
    mask[:, context:] = True
    return _batch(inputs, targets, mask)


# ----------------------------------------------------------------------------------------------------------
# Configs and batches by index

TASKS = ("memory_horizon", "mqar", "selective_copy")


def default_config(name: str) -> ml_collections.ConfigDict:
    """The task's data config with every field and its default (locked: unknown keys are errors)."""
    c = ml_collections.ConfigDict()
    c.name = name
    if name == "memory_horizon":
        # Sequence length t.
        c.seq_len = 64
        # Digit token values 0..num_digits-1.
        c.num_digits = 10
        # The target is the digit sum since the last RESET modulo this.
        c.modulus = 10
        # Probability that a position is RESET: segments are ~1/reset_prob long (the memory horizon).
        c.reset_prob = 0.1
        # Probability that a position is QUERY (a scored position).
        c.query_prob = 0.2
    elif name == "mqar":
        # Sequence length t (>= 3 * num_kv_pairs).
        c.seq_len = 256
        # Key-value pairs bound at the start, each queried once later.
        c.num_kv_pairs = 16
        # Model vocabulary: keys from [1, vocab_size/2), values from [vocab_size/2, vocab_size).
        c.vocab_size = 8192
        # Where the queries go: "power_law" (Zoology: mostly soon after the bindings) or "uniform" (any distance).
        c.query_gaps = "power_law"
        # Exponent of the power law, P(gap g) ~ (g + 1)^(power_a - 1); Zoology's 0.01; 1.0 = uniform over the slots.
        c.power_a = 0.01
        # Training rows draw K per row from min_num_kv_pairs, its doublings, ..., num_kv_pairs, equally often;
        # evaluation always uses num_kv_pairs. 0 = every training row has num_kv_pairs pairs.
        c.min_num_kv_pairs = 0
    elif name == "selective_copy":
        # Sequence length t: context of seq_len - num_copy_tokens positions, then the COPY positions.
        c.seq_len = 256
        # Data tokens scattered in the context, to be reproduced in order.
        c.num_copy_tokens = 16
        # Distinct data token values.
        c.num_values = 16
    else:
        raise ValueError(f"unknown synthetic task {name!r}; known: {TASKS}")
    # Independent examples packed into each row of seq_len positions (each seq_len / examples_per_row long), with
    # segment_ids marking them; 1 = one example per row, no segment_ids.
    c.examples_per_row = 1
    # Evaluation set: this many global batches, drawn from eval_seed (independent of the training seed).
    c.num_eval_batches = 8
    c.eval_seed = 12345
    # Threads that generate batches ahead of the trainer.
    c.read_threads = 1
    c.lock()
    return c


_GENERATORS: dict[str, tuple[Callable[..., Batch], tuple[str, ...]]] = {
    "memory_horizon": (memory_horizon, ("seq_len", "num_digits", "modulus", "reset_prob", "query_prob")),
    "mqar": (mqar_mixture, ("seq_len", "num_kv_pairs", "vocab_size", "query_gaps", "power_a", "min_num_kv_pairs")),
    "selective_copy": (selective_copy, ("seq_len", "num_copy_tokens", "num_values")),
}


def check(config: Any) -> None:
    """ConfigError naming the field if examples_per_row does not divide seq_len into examples of >= 1 position."""
    m, t = config.examples_per_row, config.seq_len
    if m < 1 or t % m:
        raise ConfigError(
            f"data.examples_per_row={m} must be >= 1 and divide data.seq_len={t} (each example is seq_len / "
            "examples_per_row positions long): pick a divisor of seq_len."
        )


def check_config(config: Any) -> None:
    """Raises ConfigError naming the field when the task's settings cannot make a batch (before any compute)."""
    if config.name not in _GENERATORS:
        raise ConfigError(f"data.name={config.name!r} is not one of {TASKS}.")
    generate, fields = _GENERATORS[config.name]
    for field in ("seq_len", "num_eval_batches", "read_threads"):
        if config[field] < 1:
            raise ConfigError(f"data.{field}={config[field]!r}: must be >= 1.")
    check(config)
    # The generator's own checks (relations between the fields), on a single example: microseconds. Any ValueError
    # it raises there is about these settings.
    kwargs = {f: config[f] for f in fields}
    kwargs["seq_len"] = config.seq_len // config.examples_per_row
    try:
        generate(np.random.default_rng(0), 1, **kwargs)
    except ValueError as e:
        note = ""
        if config.examples_per_row > 1:
            note = (
                f" (data.examples_per_row={config.examples_per_row}: each example has seq_len / "
                f"examples_per_row = {kwargs['seq_len']} positions)"
            )
        raise ConfigError(f"data: {e}{note}") from e


def vocab_size(config: Any) -> int:
    """Model vocabulary size the task needs. Also checks the knobs (the trainer calls it before compiling): one
    example is drawn, so a knob the generator refuses is an error here, at the example length seq_len / m."""
    check(config)
    fn, fields = _GENERATORS.get(config.name, (None, ()))
    if fn is not None:
        kwargs = {f: config[f] for f in fields}
        kwargs["seq_len"] = config.seq_len // config.examples_per_row
        try:
            fn(np.random.default_rng(0), 1, **kwargs)
        except ValueError as e:
            if config.examples_per_row == 1:
                raise
            raise ValueError(
                f"{e} (data.examples_per_row={config.examples_per_row}: each example has seq_len / "
                f"examples_per_row = {kwargs['seq_len']} positions)"
            ) from e
    if config.name == "memory_horizon":
        return memory_horizon_vocab(config.num_digits, config.modulus)["vocab_size"]
    if config.name == "mqar":
        return int(config.vocab_size)
    if config.name == "selective_copy":
        return selective_copy_vocab(config.num_values)["vocab_size"]
    raise ValueError(f"unknown synthetic task {config.name!r}; known: {TASKS}")


def global_batch(config: Any, *, batch_size: int, seed: int, index: int, stream: int = TRAIN_STREAM) -> Batch:
    """Global batch number `index` of the task: a pure function of (config, batch_size, seed, stream, index)."""
    check(config)
    fn, fields = _GENERATORS[config.name]
    rng = np.random.default_rng([seed, stream, index])
    m = config.examples_per_row
    kwargs = {f: config[f] for f in fields}
    if stream != TRAIN_STREAM and "min_num_kv_pairs" in kwargs:
        kwargs["min_num_kv_pairs"] = 0  # evaluation at the configured K only
    if m == 1:
        return fn(rng, batch_size, **kwargs)
    # m examples of seq_len / m positions, laid side by side in each row.
    kwargs["seq_len"] = config.seq_len // m
    batch = {k: v.reshape(batch_size, config.seq_len) for k, v in fn(rng, batch_size * m, **kwargs).items()}
    batch["segment_ids"] = np.repeat(np.arange(1, m + 1, dtype=np.int32), config.seq_len // m)[None].repeat(
        batch_size, axis=0
    )
    return batch


class _Batches:
    """Random-access source for grain: item i = this process's rows of global batch i."""

    def __init__(self, config: Any, *, global_batch_size, seed, stream, process_index, process_count, length):
        self._config, self._b, self._seed, self._stream = config, global_batch_size, seed, stream
        local = global_batch_size // process_count
        self._rows = slice(process_index * local, (process_index + 1) * local)
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Batch:
        batch = global_batch(self._config, batch_size=self._b, seed=self._seed, index=index, stream=self._stream)
        return {k: v[self._rows] for k, v in batch.items()}


def train_dataset(config, *, global_batch_size, seed, process_index, process_count) -> grain.IterDataset:
    """Infinite training batches; the grain iterator's state is the batch index, so resume is exact."""
    source = _Batches(
        config,
        global_batch_size=global_batch_size,
        seed=seed,
        stream=TRAIN_STREAM,
        process_index=process_index,
        process_count=process_count,
        length=sys.maxsize,
    )
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=4 * config.read_threads)
    return grain.MapDataset.source(source).to_iter_dataset(read)


def eval_dataset(config, *, batch_size, process_index, process_count) -> grain.MapDataset:
    """The fixed evaluation set: `num_eval_batches` global batches drawn from `eval_seed`."""
    source = _Batches(
        config,
        global_batch_size=batch_size,
        seed=config.eval_seed,
        stream=EVAL_STREAM,
        process_index=process_index,
        process_count=process_count,
        length=config.num_eval_batches,
    )
    return grain.MapDataset.source(source)
