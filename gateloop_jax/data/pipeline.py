"""Input pipeline of the text tasks (grain): token stream -> fixed windows -> shuffle -> process shard -> batch.

The prepare step (text_prep.py, for wikitext103 and text_corpus) encodes each document with SentencePiece and
stores the split as one token stream (documents concatenated in order) plus where each document ends. Packing
is then pure index arithmetic on that stream, which is what makes the guarantees cheap. Two packings
(data.packing):

  "documents" (default; what pretraining does): the scored stream is every document followed by <eod>,
      T = doc_1 <eod> doc_2 <eod> ...  (n tokens + one <eod> per document). Window j holds
      targets = T[j*t : j*t + t]; inputs[i] = T[p - 1] for the target at stream position p, except BOS where
      p starts a document (so every document, read on its own, is BOS doc -> doc <eod>).
      segment_ids int32 (t,): 1 for the window's first document (or the rest of one begun in an earlier
      window), +1 at each document start, 0 on padding. The model restarts its state at each id change, so
      a document never reads another's memory; one that crosses a window edge continues there without
      its beginning, as in any fixed-window packing.
  "stream" (the classic WikiText setting: context flows across articles, no <eod>, no segment_ids key):
      s = [BOS] + tokens; targets = tokens[j*t : j*t + t], inputs = s[j*t : j*t + t].

Either way mask = 1 on the real tokens, the last window is padded (inputs 0, targets 0, mask 0), and the
windows of a split hold every scored token as a target exactly once (nothing dropped, nothing duplicated):
split_statistics' num_tokens is their count (the stream's tokens, plus one <eod> per document when packing
documents). Training shuffles the windows with the seed, each epoch differently (grain folds the epoch into the
seed), and repeats forever; the infinite stream of windows is dealt to processes round-robin (process p gets
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

from gateloop_jax import data
from gateloop_jax.data import text_corpus, text_prep
from gateloop_jax.data import tokenizer as tok
from gateloop_jax.data import wikitext103 as wt
from gateloop_jax.errors import ConfigError, MissingPathError

Batch = dict[str, np.ndarray]
# The text tasks, by data.name: each module has NAME and prepare_command.
TASKS = {wt.NAME: wt, text_corpus.NAME: text_corpus}
PACKINGS = data.PACKINGS


def default_config(name: str = wt.NAME) -> ml_collections.ConfigDict:
    """A text task's data config with every field and its default (locked: unknown keys are errors)."""
    c = ml_collections.ConfigDict()
    c.name = name
    # Where `python -m gateloop_jax.data.<name> --data_dir ...` put the data (TFDS layout).
    c.data_dir = "~/tensorflow_datasets"
    # Tokens per training/eval window (the model's context).
    c.seq_len = 1024
    # SentencePiece vocabulary size, model type and byte fallback: together they name the tokenizer file.
    c.vocab_size = 32000
    c.model_type = "bpe"
    c.byte_fallback = True
    # "documents": each window packs whole documents, each ended by <eod>, with segment_ids so the model resets
    # at every document start; "stream": documents run together without <eod> or resets (module docstring).
    c.packing = "documents"
    # Threads that assemble batches ahead of the trainer.
    c.read_threads = 2
    c.lock()
    return c


def _name(config: Any) -> str:
    return tok.tokenizer_name(
        vocab_size=config.vocab_size, model_type=config.model_type, byte_fallback=config.byte_fallback
    )


def _task(config: Any):
    if config.name not in TASKS:
        raise ConfigError(f"data.name={config.name!r} is not a text task; known: {tuple(TASKS)}")
    if config.packing not in PACKINGS:
        raise ConfigError(
            f"data.packing={config.packing!r} is not one of {PACKINGS}: 'documents' packs documents with resets, "
            "'stream' runs them together."
        )
    return TASKS[config.name]


def prepare_command(config: Any) -> str:
    return _task(config).prepare_command(
        config.data_dir,
        vocab_size=config.vocab_size,
        model_type=config.model_type,
        byte_fallback=config.byte_fallback,
    )


def load_tokenizer(config: Any):
    """The SentencePiece processor of this config; a clear error naming the prepare command if missing."""
    path = text_prep.tokenizer_path(config.data_dir, _task(config).NAME, _name(config))
    if not os.path.exists(path):
        raise MissingPathError(
            f"tokenizer {path} does not exist: make it (and the data) with\n  {prepare_command(config)}"
        )
    return tok.load(path)


def vocab_size(config: Any) -> int:
    return int(load_tokenizer(config).get_piece_size())


def split_statistics(config: Any, split: str) -> dict[str, int]:
    """{"num_words", "num_bytes", "num_lines", "num_documents", "num_tokens"} of a split (text_prep.py).

    num_tokens counts the split's scored tokens under config.packing: with "documents", one <eod> per document more.
    """
    stats = text_prep.split_statistics(
        config.data_dir, _task(config).NAME, _name(config), split, prepare_command(config)
    )
    if config.packing == "documents":
        stats["num_tokens"] += stats["num_documents"]
    return stats


def _load(config: Any, split: str, path_fn) -> np.ndarray:
    if split not in text_prep.SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {text_prep.SPLITS}")
    path = path_fn(config.data_dir, _task(config).NAME, _name(config), split)
    if not os.path.exists(path):
        raise MissingPathError(f"{path} does not exist: prepare the data with\n  {prepare_command(config)}")
    return np.load(path, mmap_mode="r")


def load_tokens(config: Any, split: str) -> np.ndarray:
    """The split's token stream (documents concatenated, no <eod>), memory-mapped. Shape (n,)."""
    return _load(config, split, text_prep.tokens_path)


def load_ends(config: Any, split: str) -> np.ndarray:
    """Where each document of the split ends in its token stream: int64 (num_documents,)."""
    return np.asarray(_load(config, split, text_prep.ends_path), np.int64)


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


class Documents:
    """The "documents" packing of a split (module docstring): T = doc_1 <eod> doc_2 <eod> ..., cut into windows.

    tokens (n,) is the stream without <eod>; ends (num_documents,) where each document ends in it.
    """

    def __init__(self, tokens: np.ndarray, ends: np.ndarray, bos_id: int = tok.BOS_ID, eod_id: int = tok.EOD_ID):
        self.tokens, self.bos_id, self.eod_id = tokens, bos_id, eod_id
        self.begins = np.concatenate([[0], ends]).astype(np.int64)[:-1]
        self.lengths = ends - self.begins
        # Document k starts at T position begins[k] + k (the k <eod>s before it).
        self.starts = self.begins + np.arange(len(ends))
        self.size = int(len(tokens) + len(ends))

    def window(self, index: int, seq_len: int) -> Batch:
        """Window `index`; past the end, an empty window. Returns inputs, targets, segment_ids int32 (t,), mask
        float32 (t,)."""
        p = index * seq_len + np.arange(seq_len)
        n = int(np.clip(self.size - index * seq_len, 0, seq_len))
        out = {k: np.zeros((seq_len,), np.int32) for k in ("inputs", "targets", "segment_ids")}
        out["mask"] = np.zeros((seq_len,), np.float32)
        if not n:
            return out
        p = p[:n]
        # Document of each position: search only the few document starts inside the window.
        first_doc = int(np.searchsorted(self.starts, p[0], side="right")) - 1
        last_doc = int(np.searchsorted(self.starts, p[-1], side="right")) - 1
        doc = first_doc + np.searchsorted(self.starts[first_doc + 1 : last_doc + 1], p, side="right")
        offset = p - self.starts[doc]
        # Stream position of each target (the <eod>s before it are not in the stream); the window reads one
        # contiguous slice of the stream.
        at = p - doc
        lo = max(int(at[0]) - 1, 0)
        chunk = np.asarray(self.tokens[lo : int(at[-1]) + 1]).astype(np.int32)
        last = max(len(chunk) - 1, 0)
        chunk = chunk if len(chunk) else np.zeros((1,), np.int32)
        eod = offset == self.lengths[doc]
        targets = np.where(eod, self.eod_id, chunk[np.clip(at - lo, 0, last)])
        inputs = np.where(offset == 0, self.bos_id, chunk[np.clip(at - 1 - lo, 0, last)])
        out["targets"][:n], out["inputs"][:n] = targets, inputs
        out["segment_ids"][:n] = doc - doc[0] + 1
        out["mask"][:n] = 1.0
        return out


def window_dataset(config: Any, split: str, count: int | None = None) -> grain.MapDataset:
    """Windows 0..count-1 of the split under config.packing (count defaults to all of them; extra ones are empty
    padding)."""
    _task(config)  # checks data.name and data.packing
    tokens = load_tokens(config, split)
    t = config.seq_len
    if config.packing == "documents":
        packed = Documents(tokens, load_ends(config, split))
        count = num_windows(packed.size, t) if count is None else count
        return grain.MapDataset.range(count).map(lambda j: packed.window(j, t))
    count = num_windows(len(tokens), t) if count is None else count
    return grain.MapDataset.range(count).map(lambda j: window(tokens, j, t))


def train_dataset(config, *, global_batch_size, seed, process_index, process_count) -> grain.IterDataset:
    """Infinite shuffled training batches of this process: (B_local, t) arrays, B_local = B / process_count."""
    ds = window_dataset(config, "train")
    # Shuffle before repeat: each epoch is a permutation of the same windows, reseeded per epoch by grain.
    ds = ds.shuffle(seed=seed % 2**32).repeat()
    ds = ds[process_index::process_count].batch(global_batch_size // process_count, drop_remainder=True)
    read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=4 * config.read_threads)
    return ds.to_iter_dataset(read)


def eval_dataset(config, *, split, batch_size, process_index, process_count) -> grain.MapDataset:
    """The split's windows in order, padded to whole global batches, this process's share batched."""
    count = len(window_dataset(config, split))
    padded = math.ceil(count / batch_size) * batch_size
    ds = window_dataset(config, split, padded)
    return ds[process_index::process_count].batch(batch_size // process_count, drop_remainder=True)
