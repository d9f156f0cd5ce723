"""Perplexity of a trained model on any UTF-8 text file or on a split of its training data.

    python -m gateloop_jax.evaluate --workdir W --text_file notes.txt [--out result.json]
    python -m gateloop_jax.evaluate --workdir W --split validation [--step N] [--data_dir D]

W is a training workdir, its checkpoints directory or an export (gateloop_jax.export). The text is tokenized by the
model's own tokenizer with the training data's rule (each non-blank line stripped, encoded, followed by EOS; the
stream starts with BOS) and cut into consecutive windows of the training context (--seq_len to change it), exactly as
the trainer's evaluation cuts a split, so `--split validation` reproduces the trainer's eval/ metrics and a text file
holding the split's raw text gives the same numbers. Reported (JSON, on stdout and in --out):

    loss, ppl        nats per token and token perplexity (depend on the tokenizer)
    word_ppl         exp(total NLL / words), words = whitespace-separated pieces of the text
    bits_per_byte    total NLL / (UTF-8 bytes of the text * ln 2)

(gateloop_jax/data/metrics.py defines them.) Each window starts from an empty recurrent state, as in training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Iterable

import jax
import numpy as np


def _windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> tuple[Iterable[dict[str, np.ndarray]], int]:
    """The stream [BOS] + tokens in consecutive (batch_size, seq_len) batches (the last padded with mask 0)."""
    from gateloop_jax.data import pipeline

    count = pipeline.num_windows(len(tokens), seq_len)
    num_batches = math.ceil(count / batch_size)

    def batches():
        for i in range(num_batches):
            rows = [pipeline.window(tokens, j, seq_len) for j in range(i * batch_size, (i + 1) * batch_size)]
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    return batches(), num_batches


def evaluate_batches(model, batches: Iterable[dict[str, np.ndarray]], *, num_batches: int | None = None,
                     chunk_size: int = 0, mode: str | None = None, progress: bool = True) -> dict[str, float]:
    """Summed {"nll", "correct", "count"} of a CausalLM over batches of {"inputs", "targets", "mask"} (b, t)."""
    from flax import nnx
    from tqdm import tqdm

    from gateloop_jax.train.loss import model_token_stats

    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, batch):
        return model_token_stats(nnx.merge(graphdef, state), batch["inputs"], batch["targets"], batch["mask"],
                                 chunk_size=chunk_size, mode=mode, deterministic=True)

    totals = {"nll": 0.0, "correct": 0.0, "count": 0.0}
    for batch in tqdm(batches, total=num_batches, desc="evaluate", unit="batch", disable=not progress,
                      file=sys.stderr):
        out = jax.device_get(stats(state, {k: batch[k] for k in ("inputs", "targets", "mask")}))
        for k in totals:
            totals[k] += float(out[k])
    return totals


def evaluate(path: str, *, text_file: str | None = None, split: str | None = None, step: int | None = None,
             seq_len: int | None = None, batch_size: int = 8, data_dir: str | None = None, mode: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """The metrics of the model at `path` on a text file or a data split (exactly one of them); see the module doc."""
    if (text_file is None) == (split is None):
        raise ValueError("evaluate: give exactly one of text_file (any UTF-8 file) or split (e.g. 'validation').")
    if batch_size < 1 or (seq_len is not None and seq_len < 1):
        raise ValueError(f"evaluate: batch_size={batch_size} and seq_len={seq_len} must be >= 1.")
    if text_file is not None and not os.path.isfile(text_file):
        raise FileNotFoundError(f"evaluate: text_file={text_file!r} does not exist.")
    from gateloop_jax import data
    from gateloop_jax.checkpoint_io import latest_step, load
    from gateloop_jax.data import tokenizer as tok_lib
    from gateloop_jax.train.loss import chunk_size_for

    start = time.perf_counter()
    model, config, tokenizer = load(path, step, tokenizer=text_file is not None)
    seq_len = int(seq_len or config.data.seq_len)
    chunk = chunk_size_for(config.get("loss_chunk_size", 256), config.get("chunked_loss_min_vocab", 8192),
                           model.config.vocab_size)
    result: dict[str, Any] = {"path": os.path.abspath(path), "step": latest_step(path) if step is None else step,
                              "seq_len": seq_len}
    counts: dict[str, int] = {}
    if text_file is not None:
        if tokenizer is None:
            raise ValueError(f"evaluate: the model at {path} was trained on {config.data.name!r}, which has no "
                             "tokenizer; evaluate it with --split instead of --text_file.")
        try:
            with open(text_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"evaluate: text_file={text_file!r} is not valid UTF-8 ({e}); convert it first "
                             "(e.g. iconv -t UTF-8).") from e
        tokens = tok_lib.encode_text(tokenizer, text)
        if not len(tokens):
            raise ValueError(f"evaluate: text_file={text_file!r} has no text (only blank lines).")
        batches, num_batches = _windows(tokens, seq_len, batch_size)
        counts = {"num_words": len(text.split()), "num_bytes": len(text.encode("utf-8"))}
        result["text_file"] = os.path.abspath(text_file)
    else:
        data_config = config.data
        data_config.seq_len = seq_len
        if data_dir is not None:
            data_config.data_dir = data_dir
        batches = data.eval_batches(data_config, split=split, batch_size=batch_size)
        num_batches = len(batches) if hasattr(batches, "__len__") else None
        if data_config.name in data.TEXT_NAMES:
            stats = data.split_statistics(data_config, split)
            counts = {"num_words": stats["num_words"], "num_bytes": stats["num_bytes"]}
        result["split"] = split
    totals = evaluate_batches(model, batches, num_batches=num_batches, chunk_size=chunk, mode=mode,
                              progress=progress)
    if totals["count"] == 0:
        raise ValueError("evaluate: no scored tokens.")
    result.update(num_tokens=int(totals["count"]), **counts)
    result.update(data.lm_metrics(totals["nll"], int(totals["count"]), **counts))
    result["accuracy"] = totals["correct"] / totals["count"]
    result["seconds"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m gateloop_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="training workdir, checkpoints directory or export directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text_file", help="any UTF-8 text file")
    source.add_argument("--split", help="a split of the model's training data (WikiText: validation, test, train)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--seq_len", type=int, default=None, help="window length (default: the training context)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--data_dir", default=None, help="where the prepared data is, if not where training had it")
    p.add_argument("--mode", default=None, help="GateLoop computation mode (default: the model's)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        result = evaluate(args.workdir, text_file=args.text_file, split=args.split, step=args.step,
                          seq_len=args.seq_len, batch_size=args.batch_size, data_dir=args.data_dir, mode=args.mode,
                          progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
