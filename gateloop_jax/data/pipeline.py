"""WikiText-103 input pipeline (grain): token stream -> fixed windows -> shuffle -> process shard -> batch.

The prepare step (wikitext103.py) reads the TFDS array_record files with grain, encodes each article with
SentencePiece and stores the split as one token stream (articles concatenated in file order). Packing is
then pure index arithmetic on that stream, which is what makes the guarantees cheap:

  stream s = [BOS] + tokens (n tokens);  window j (j = 0 .. ceil(n / t) - 1):
      targets = tokens[j*t : j*t + t]      inputs = s[j*t : j*t + t]      (inputs[i] precedes targets[i])
      mask    = 1 on the real tokens; the last window is padded (inputs 0, targets 0, mask 0).

So the windows of a split hold every token as a target exactly once (nothing dropped, nothing duplicated).
Training shuffles the windows with the seed, each epoch differently (grain folds the epoch into the seed),
and repeats forever; the infinite stream of windows is dealt to processes round-robin (process p gets
windows p, p + P, ...), so global batch g is the windows g*B .. g*B + B - 1 whatever the process count.
grain's iterator state is just the next batch index, hence exact resume. Evaluation takes the windows in
order, padded with empty windows to a whole number of global batches, so every process runs the same number
of batches. Why not encode on the fly and pack with grain's streaming packer: exact per-split coverage, equal
eval batch counts per process and the token counts for the metrics all need the global token offsets, which
need one encoding pass anyway; keeping its result makes every later epoch free.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from gateloop_jax.data import tokenizer as tok
from gateloop_jax.data import wikitext103 as wt
from gateloop_jax.errors import MissingPathError

Batch = dict[str, np.ndarray]


def default_config() -> ml_collections.ConfigDict:
    """The WikiText-103 data config with every field and its default (locked: unknown keys are errors)."""
    c = ml_collections.ConfigDict()
    c.name = "wikitext103"
    # Where `python -m gateloop_jax.data.wikitext103 --data_dir ...` put the data (TFDS layout).
    c.data_dir = "~/tensorflow_datasets"
    # Tokens per training/eval window (the model's context).
    c.seq_len = 1024
    # SentencePiece vocabulary size, model type and byte fallback: together they name the tokenizer file.
    c.vocab_size = 32000
    c.model_type = "bpe"
    c.byte_fallback = True
    # Threads that assemble batches ahead of the trainer.
    c.read_threads = 2
    c.lock()
    return c


def _name(config: Any) -> str:
    return tok.tokenizer_name(
        vocab_size=config.vocab_size, model_type=config.model_type, byte_fallback=config.byte_fallback
    )


def _command(config: Any) -> str:
    return wt.prepare_command(
        config.data_dir,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        byte_fallback=config.byte_fallback,
    )


def load_tokenizer(config: Any):
    """The SentencePiece processor of this config; a clear error naming the prepare command if missing."""
    path = wt.tokenizer_path(config.data_dir, _name(config))
    if not os.path.exists(path):
        raise MissingPathError(f"tokenizer {path} does not exist: make it (and the data) with\n  {_command(config)}")
    return tok.load(path)


def vocab_size(config: Any) -> int:
    return int(load_tokenizer(config).get_piece_size())


def split_statistics(config: Any, split: str) -> dict[str, int]:
    """{"num_words", "num_bytes", "num_lines", "num_documents", "num_tokens"} of a split (see wikitext103.py)."""
    return wt.split_statistics(config.data_dir, _name(config), split, _command(config))


def load_tokens(config: Any, split: str) -> np.ndarray:
    """The split's token stream, memory-mapped. Shape (n,)."""
    if split not in wt.SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {wt.SPLITS}")
    path = wt.tokens_path(config.data_dir, _name(config), split)
    if not os.path.exists(path):
        raise MissingPathError(f"token file {path} does not exist: prepare the data with\n  {_command(config)}")
    return np.load(path, mmap_mode="r")


def num_windows(num_tokens: int, seq_len: int) -> int:
    return math.ceil(num_tokens / seq_len)


def window(tokens: np.ndarray, index: int, seq_len: int, bos_id: int = tok.BOS_ID) -> Batch:
    """Window `index` of the stream [BOS] + tokens (module docstring); past the end, an empty window.

    Returns: {"inputs": int32 (t,), "targets": int32 (t,), "mask": float32 (t,)}.
    """
    start = index * seq_len
    stop = min(start + seq_len, len(tokens))
    n = max(stop - start, 0)
    inputs = np.zeros((seq_len,), np.int32)
    targets = np.zeros((seq_len,), np.int32)
    mask = np.zeros((seq_len,), np.float32)
    if n:
        targets[:n] = tokens[start:stop]
        if start == 0:
            inputs[0] = bos_id
            inputs[1:n] = tokens[: n - 1]
        else:
            inputs[:n] = tokens[start - 1 : stop - 1]
        mask[:n] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


def window_dataset(tokens: np.ndarray, seq_len: int, count: int | None = None) -> grain.MapDataset:
    """Windows 0..count-1 of the stream (count defaults to ceil(n / t); extra ones are empty padding)."""
    count = num_windows(len(tokens), seq_len) if count is None else count
    return grain.MapDataset.range(count).map(lambda j: window(tokens, j, seq_len))


def train_dataset(config, *, global_batch_size, seed, process_index, process_count) -> grain.IterDataset:
    """Infinite shuffled training batches of this process: (B_local, t) arrays, B_local = B / process_count."""
    tokens = load_tokens(config, "train")
    ds = window_dataset(tokens, config.seq_len)
    # Shuffle before repeat: each epoch is a permutation of the same windows, reseeded per epoch by grain.
    ds = ds.shuffle(seed=seed % 2**32).repeat()
    ds = ds[process_index::process_count].batch(global_batch_size // process_count, drop_remainder=True)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=4 * config.read_threads)
    return ds.to_iter_dataset(read)


def eval_dataset(config, *, split, batch_size, process_index, process_count) -> grain.MapDataset:
    """The split's windows in order, padded to whole global batches, this process's share batched."""
    tokens = load_tokens(config, split)
    count = num_windows(len(tokens), config.seq_len)
    padded = math.ceil(count / batch_size) * batch_size
    ds = window_dataset(tokens, config.seq_len, padded)
    return ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True)
