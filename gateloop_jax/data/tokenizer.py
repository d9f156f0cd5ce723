"""SentencePiece tokenizer of the text tasks: training, loading, and the one encoding rule of the pipeline.

Encoding rule (used at prepare time for the token files and the token counts, and by notebooks):
every non-blank line of the raw text is stripped, encoded, and followed by EOS; blank lines carry no tokens
(in WikiText they only separate paragraphs and headings). So EOS plays the role of the newline, and a split
becomes one stream: line_1 EOS line_2 EOS ... The pipeline starts each split's stream with a single BOS so
that the first real token is also a target.

Ids: unk 0, bos 1, eos 2 (SentencePiece's defaults), and the user-defined piece <eod> 3 that ends each document
when the pipeline packs documents (EOS already ends every line, so a document's end needs a piece of its own);
no pad piece, padding positions carry mask 0.
Normalisation is "identity" (no NFKC), so decoding gives back the raw characters and bits per byte refers to
the text as distributed.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from typing import Iterable

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, EOD_ID = 0, 1, 2, 3
EOD_PIECE = "<eod>"


def tokenizer_name(*, vocab_size: int, model_type: str, byte_fallback: bool) -> str:
    """File stem of a tokenizer, e.g. spm_bpe_32000 (spm_bpe_32000_nobytes without byte fallback)."""
    return f"spm_{model_type}_{vocab_size}" + ("" if byte_fallback else "_nobytes")


def train_tokenizer(
    sentences: Iterable[str],
    model_path: str,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    input_sentence_size: int = 2_000_000,
    num_threads: int = os.cpu_count() or 1,
) -> str:
    """Trains SentencePiece on `sentences` (one line of text each) and writes `model_path` (ends in .model).

    `input_sentence_size` caps the sentences SentencePiece samples (its memory grows with the corpus; WikiText-103
    train has ~1.2M non-blank lines). Byte fallback maps characters outside the vocabulary to byte pieces
    instead of <unk>, so every input is encodable.
    """
    if not model_path.endswith(".model"):
        raise ValueError(f"model_path must end in .model, got {model_path}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    # Train into a temporary directory and move, so an interrupted run never leaves a half-written model that
    # later looks prepared.
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(model_path))) as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            _train(sentences, prefix, vocab_size, model_type, byte_fallback, input_sentence_size, num_threads)
        except RuntimeError as e:
            largest = re.search(r"Vocabulary size too high .*<= (\d+)", str(e))
            if largest is None:
                raise
            raise ValueError(
                f"vocab_size={vocab_size} is more pieces than this training text can give (at most "
                f"{largest.group(1)}): pass a smaller --vocab_size to the prepare command, and the same "
                f"--config.data.vocab_size to the trainer."
            ) from e
        shutil.move(prefix + ".vocab", model_path[: -len(".model")] + ".vocab")
        shutil.move(prefix + ".model", model_path)
    return model_path


def _train(sentences, prefix, vocab_size, model_type, byte_fallback, input_sentence_size, num_threads) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        character_coverage=0.9995 if byte_fallback else 1.0,
        normalization_rule_name="identity",
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        # User-defined pieces take the ids right after the specials: <eod> is EOD_ID.
        user_defined_symbols=[EOD_PIECE],
        num_threads=num_threads,
        minloglevel=2,
    )


def load(model_path: str) -> spm.SentencePieceProcessor:
    """The processor of `model_path`; ValueError if it lacks the <eod> piece at EOD_ID (then remake it)."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    if sp.get_piece_size() <= EOD_ID or sp.id_to_piece(EOD_ID) != EOD_PIECE:
        raise ValueError(
            f"tokenizer {model_path} has no {EOD_PIECE} piece at id {EOD_ID}, which packed documents end with: "
            f"delete {model_path} and its token folder, then rerun the prepare command to retrain it."
        )
    return sp


def text_lines(text: str) -> list[str]:
    """The encoded lines of a text: its non-blank lines, stripped."""
    return [s for s in (line.strip() for line in text.split("\n")) if s]


def encode_lines(sp: spm.SentencePieceProcessor, lines: list[str], num_threads: int = 1) -> np.ndarray:
    """Token ids of stripped, non-blank lines: each line's pieces then EOS, concatenated. Shape (n,), int32.

    SentencePiece holds the GIL while encoding, so parallelism comes from its own batch threads: pass many
    lines per call.
    """
    ids = sp.encode(lines, out_type=int, add_eos=True, num_threads=num_threads)
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, sum(map(len, ids)))


def encode_documents(
    sp: spm.SentencePieceProcessor, texts: Iterable[str], num_threads: int = 1, lines_per_call: int = 20_000
) -> tuple[np.ndarray, np.ndarray]:
    """The token stream of some texts (encode_text of each, concatenated) and where each text's tokens end.

    Returns: stream int32 (n,), ends int64 (num_texts,) with ends[i] = tokens of texts 0..i (so text i is
    stream[ends[i-1]:ends[i]]). Lines of many texts go to SentencePiece together (its batch threads need them).
    """
    parts, counts, lines, line_counts = [], [], [], []

    def flush():
        ids = sp.encode(lines, out_type=int, add_eos=True, num_threads=num_threads)
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        parts.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())))
        # Each text's token count: the sum of its lines' lengths (a text without lines has none).
        bounds = np.concatenate([[0], np.cumsum(line_counts)])
        sums = np.concatenate([[0], np.cumsum(lengths)])
        counts.append(sums[bounds[1:]] - sums[bounds[:-1]])
        lines.clear()
        line_counts.clear()

    for text in texts:
        text_lines_ = text_lines(text)
        lines += text_lines_
        line_counts.append(len(text_lines_))
        if len(lines) >= lines_per_call:
            flush()
    flush()
    return np.concatenate(parts), np.cumsum(np.concatenate(counts)).astype(np.int64)


def encode_text(sp: spm.SentencePieceProcessor, text: str, num_threads: int = 1) -> np.ndarray:
    """Token ids of `text` by the rule above: each non-blank line's pieces then EOS. Shape (n,), int32."""
    return encode_lines(sp, text_lines(text), num_threads)
