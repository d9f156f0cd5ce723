"""The prepare step every text task shares: TFDS builder -> statistics -> SentencePiece -> token files.

A text task (wikitext103.py, text_corpus.py) supplies a TFDS builder with the splits SPLITS, one example
{"title", "text"} per document in a fixed order; `prepare` makes everything the pipeline reads, under
DATA_DIR/<dataset>/:

    1.0.0/                          TFDS array_record files, one example per document
    statistics.json                 per split: num_words, num_bytes, num_lines, num_documents of the raw text
    spm_bpe_32000.model/.vocab      SentencePiece trained on the train split (tokenizer.py names it)
    spm_bpe_32000/{split}.npy       the split's token stream (tokenizer.encode_text of each document, in order)
    spm_bpe_32000/{split}_ends.npy  int64 (num_documents,): where each document's tokens end in the stream
    spm_bpe_32000/statistics.json   per split: num_tokens (of the stream, without end-of-document tokens)

Each step is skipped when its output exists, so a second vocab size only trains and encodes.
Word count (for word-level perplexity): whitespace-separated tokens of the raw text, `len(text.split())`;
num_lines counts every line (blank ones too).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any, Iterable

import grain
import numpy as np
import tensorflow_datasets as tfds

from gateloop_jax.data import tokenizer as tok
from gateloop_jax.errors import ConfigError, MissingPathError

SPLITS = ("train", "validation", "test")


def root_dir(data_dir: str, dataset: str) -> str:
    return os.path.join(os.path.expanduser(data_dir), dataset)


def tokenizer_path(data_dir: str, dataset: str, name: str) -> str:
    return os.path.join(root_dir(data_dir, dataset), name + ".model")


def tokens_path(data_dir: str, dataset: str, name: str, split: str) -> str:
    return os.path.join(root_dir(data_dir, dataset), name, f"{split}.npy")


def ends_path(data_dir: str, dataset: str, name: str, split: str) -> str:
    return os.path.join(root_dir(data_dir, dataset), name, f"{split}_ends.npy")


def documents(builder: tfds.core.DatasetBuilder, split: str, *, read_threads: int = 2) -> grain.IterDataset:
    """The split's document texts (str), in order, read by grain from the builder's array_record files."""
    source = builder.as_data_source(split=split)
    ds = grain.MapDataset.source(source).map(lambda ex: ex["text"].decode("utf-8"))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))


def text_statistics(texts: Iterable[str]) -> dict[str, int]:
    """num_words (whitespace-separated tokens), num_bytes (UTF-8), num_lines, num_documents of some texts."""
    stats = {"num_words": 0, "num_bytes": 0, "num_lines": 0, "num_documents": 0}
    for text in texts:
        stats["num_words"] += len(text.split())
        stats["num_bytes"] += len(text.encode("utf-8"))
        stats["num_lines"] += text.count("\n")
        stats["num_documents"] += 1
    return stats


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def split_statistics(data_dir: str, dataset: str, name: str, split: str, command: str) -> dict[str, int]:
    """{"num_words", "num_bytes", "num_lines", "num_documents", "num_tokens"} of a prepared split."""
    text_json = os.path.join(root_dir(data_dir, dataset), "statistics.json")
    token_json = os.path.join(root_dir(data_dir, dataset), name, "statistics.json")
    for path in (text_json, token_json):
        if not os.path.exists(path):
            raise MissingPathError(f"{path} does not exist: prepare the data with\n  {command}")
    return {**_read_json(text_json)[split], **_read_json(token_json)[split]}


def prepare(
    builder: tfds.core.DatasetBuilder,
    data_dir: str,
    download_config: tfds.download.DownloadConfig,
    *,
    vocab_size: int = 32000,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    input_sentence_size: int = 2_000_000,
    read_threads: int = 2,
) -> dict[str, Any]:
    """Builds the dataset, its statistics, the tokenizer and the token files (each only if missing).

    Returns a summary: the split statistics and seconds spent per step (0 for steps skipped).
    """
    data_dir, dataset = os.path.expanduser(data_dir), builder.name
    name = tok.tokenizer_name(vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback)
    seconds = {}

    t0 = time.perf_counter()
    builder.download_and_prepare(download_config=download_config)
    seconds["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_json = os.path.join(root_dir(data_dir, dataset), "statistics.json")
    if not os.path.exists(text_json):
        stats = {s: text_statistics(documents(builder, s, read_threads=read_threads)) for s in SPLITS}
        _write_json(text_json, stats)
    seconds["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = tokenizer_path(data_dir, dataset, name)
    if not os.path.exists(model):
        sentences = (
            line for text in documents(builder, "train", read_threads=read_threads) for line in tok.text_lines(text)
        )
        tok.train_tokenizer(
            sentences,
            model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
        )
    seconds["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    token_json = os.path.join(root_dir(data_dir, dataset), name, "statistics.json")
    ends = [ends_path(data_dir, dataset, name, s) for s in SPLITS]
    if not (os.path.exists(token_json) and all(map(os.path.exists, ends))):
        sp = tok.load(model)
        os.makedirs(os.path.dirname(token_json), exist_ok=True)
        counts = {}
        for split in SPLITS:
            stream, doc_ends = tok.encode_documents(
                sp, documents(builder, split, read_threads=read_threads), read_threads
            )
            # uint16 halves the file (and the page cache) whenever the vocabulary fits.
            stream = stream.astype(np.uint16 if sp.get_piece_size() <= 2**16 else np.int32)
            for path, array in (
                (tokens_path(data_dir, dataset, name, split), stream),
                (ends_path(data_dir, dataset, name, split), doc_ends),
            ):
                np.save(path + ".tmp.npy", array)
                os.replace(path + ".tmp.npy", path)
            counts[split] = {"num_tokens": int(stream.size)}
        _write_json(token_json, counts)
    seconds["encode"] = time.perf_counter() - t0

    stats = {s: split_statistics(data_dir, dataset, name, s, "the prepare command") for s in SPLITS}
    return {"statistics": stats, "seconds": seconds, "tokenizer": model}


def add_tokenizer_arguments(parser: argparse.ArgumentParser, vocab_size: int = 32000) -> None:
    """The tokenizer and reading flags every text task's prepare command takes."""
    parser.add_argument("--data_dir", required=True, help="where the dataset, tokenizer and token files go")
    parser.add_argument("--vocab_size", type=int, default=vocab_size)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--nobyte_fallback", dest="byte_fallback", action="store_false")
    parser.add_argument("--input_sentence_size", type=int, default=2_000_000)
    parser.add_argument("--read_threads", type=int, default=os.cpu_count() or 2)


def check_tokenizer_args(args: argparse.Namespace) -> None:
    """add_tokenizer_arguments' ranges and --data_dir, before anything is built (ConfigError naming the flag)."""
    for field in ("vocab_size", "input_sentence_size", "read_threads"):
        if getattr(args, field) < 1:
            raise ConfigError(f"--{field}={getattr(args, field)}: must be >= 1.")
    data_dir = os.path.expanduser(args.data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir={args.data_dir!r} is an existing file; pass a directory (created if missing).")


def tokenizer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("vocab_size", "model_type", "byte_fallback", "input_sentence_size", "read_threads")
    return {k: getattr(args, k) for k in keys}


def command_flags(*, vocab_size: int, model_type: str, byte_fallback: bool) -> str:
    """The flags that name a tokenizer on a prepare command line."""
    flags = f" --vocab_size {vocab_size}"
    if model_type != "bpe":
        flags += f" --model_type {model_type}"
    if not byte_fallback:
        flags += " --nobyte_fallback"
    return flags
