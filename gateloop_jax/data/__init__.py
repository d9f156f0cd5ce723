"""Data: text tasks (TFDS + SentencePiece + grain) and synthetic tasks, all as {"inputs","targets","mask"}.

Every batch is a dict of NumPy arrays: inputs int32 (b, t), targets int32 (b, t), mask float32 (b, t);
the loss is the mask-weighted cross-entropy of targets given inputs[:, :i+1] at each position i. Packed batches
(text tasks with data.packing="documents", synthetic tasks with data.examples_per_row > 1) also have
segment_ids int32 (b, t): 1 for a row's first document, +1 at each document start, 0 on padding; the model
starts afresh wherever the id changes.

Text tasks: "wikitext103" (WikiText-103) and "text_corpus" (your folder of .txt files, data/text_corpus.py).

    config = data.default_config("memory_horizon")     # or "mqar", "selective_copy", "wikitext103", "text_corpus"
    it = data.train_iterator(config, global_batch_size=64, seed=0)
    batch = next(it); state = it.get_state()           # JSON-serialisable; it.set_state(state) resumes exactly
    for batch in data.eval_batches(config, split="validation", batch_size=64): ...
"""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from gateloop_jax.data import synthetic
from gateloop_jax.errors import ConfigError
from gateloop_jax.data.metrics import lm_metrics

# The text-task modules (TFDS, SentencePiece) load on first use: synthetic-task runs never pay for TFDS's
# import, and `python -m gateloop_jax.data.wikitext103` does not find its own module half-imported.


def _pipeline():
    from gateloop_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    return pipeline


TEXT_NAMES = ("wikitext103", "text_corpus")
# data.packing of the text tasks (data/pipeline.py): whole documents with <eod> and segment_ids, or one stream.
PACKINGS = ("documents", "stream")
NAMES = (*synthetic.TASKS, *TEXT_NAMES)

__all__ = [
    "NAMES",
    "TEXT_NAMES",
    "PACKINGS",
    "check_config",
    "prepare_command",
    "default_config",
    "vocab_size",
    "train_iterator",
    "eval_batches",
    "lm_metrics",
    "load_tokenizer",
    "split_statistics",
]


def _check_name(config: Any) -> str:
    if config.name not in NAMES:
        raise ValueError(f"unknown data name {config.name!r}; known: {NAMES}")
    return config.name


def _local_batch_size(batch_size: int, field: str, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"{field}={batch_size} is not divisible by process_count={process_count}")
    return batch_size // process_count


def default_config(name: str) -> ml_collections.ConfigDict:
    """Every field of the named task's data config, with its default and a comment (locked ConfigDict)."""
    if name in TEXT_NAMES:
        return _pipeline().default_config(name)
    if name in synthetic.TASKS:
        return synthetic.default_config(name)
    raise ValueError(f"unknown data name {name!r}; known: {NAMES}")


def check_config(config: Any) -> None:
    """Raises ConfigError naming the field when the data settings cannot make a batch (no data is read)."""
    if config.name not in NAMES:
        raise ConfigError(f"data.name={config.name!r} is not one of {NAMES}.")
    if config.name in TEXT_NAMES:
        for field in ("seq_len", "vocab_size", "read_threads"):
            if config[field] < 1:
                raise ConfigError(f"data.{field}={config[field]!r}: must be >= 1.")
        if config.packing not in PACKINGS:
            raise ConfigError(
                f"data.packing={config.packing!r} is not one of {PACKINGS}: 'documents' packs documents with "
                "resets, 'stream' runs them together."
            )
        return
    synthetic.check_config(config)


def vocab_size(config: Any) -> int:
    """The model vocabulary size the data needs (text tasks: read from the tokenizer file)."""
    if _check_name(config) in TEXT_NAMES:
        return _pipeline().vocab_size(config)
    return synthetic.vocab_size(config)


def train_iterator(config: Any, *, global_batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Infinite iterator of this process's training batches (B_local, t), B_local = global_batch_size / process_count.

    The returned grain iterator has get_state() -> JSON-serialisable dict and set_state(state): after
    set_state, the next batch is exactly the one that followed when the state was taken.
    """
    _local_batch_size(global_batch_size, "global_batch_size", process_index, process_count)
    kwargs = dict(
        global_batch_size=global_batch_size, seed=seed, process_index=process_index, process_count=process_count
    )
    if _check_name(config) in TEXT_NAMES:
        return iter(_pipeline().train_dataset(config, **kwargs))
    return iter(synthetic.train_dataset(config, **kwargs))


def eval_batches(
    config: Any, *, split: str, batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterable:
    """Finite, re-iterable evaluation batches of this process, (batch_size / process_count, t) each.

    `batch_size` is global, like train_iterator's. Text tasks: the split's windows in order; over all processes
    every token of the split is a target with mask 1 exactly once, padding has mask 0, and every process gets
    the same number of batches. Synthetic tasks (split ignored): `num_eval_batches` fixed batches from
    `eval_seed`.
    """
    _local_batch_size(batch_size, "batch_size", process_index, process_count)
    if _check_name(config) in TEXT_NAMES:
        return _pipeline().eval_dataset(
            config, split=split, batch_size=batch_size, process_index=process_index, process_count=process_count
        )
    return synthetic.eval_dataset(
        config, batch_size=batch_size, process_index=process_index, process_count=process_count
    )


def load_tokenizer(config: Any):
    """SentencePiece processor of a text task's config (for the pipeline and notebooks)."""
    return _pipeline().load_tokenizer(config)


def split_statistics(config: Any, split: str) -> dict[str, int]:
    """{"num_words", "num_bytes", "num_tokens", ...} of a text task's split, the denominators of lm_metrics."""
    return _pipeline().split_statistics(config, split)


def prepare_command(config: Any) -> str:
    """The command that prepares a text task's data for this config."""
    return _pipeline().prepare_command(config)
