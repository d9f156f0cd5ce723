"""WikiText-103 (raw): a TFDS builder writing array_record, the prepare step, and its command line.

One command prepares everything the pipeline reads (dataset, statistics, tokenizer, token files):

    python -m gateloop_jax.data.wikitext103 --manual_dir DIR --data_dir DATA_DIR [--vocab_size 32000]

DIR holds the official raw archive wikitext-103-raw-v1.zip (unextracted, or its extracted folder
wikitext-103-raw/). Without --manual_dir the archive is downloaded from ARCHIVE_URL (needs network).
Everything lands under DATA_DIR/wikitext103/:

    1.0.0/                       TFDS array_record files, one example per article (Wikitext103 builder)
    statistics.json              per split: num_words, num_bytes, num_lines, num_documents of the raw text
    spm_bpe_32000.model/.vocab   SentencePiece trained on the train split (tokenizer.py names it)
    spm_bpe_32000/{split}.npy    the split's token stream (tokenizer.encode_text of each article, in order)
    spm_bpe_32000/statistics.json  per split: num_tokens

Each step is skipped when its output exists, so a second vocab size only trains and encodes.
The builder needs no TensorFlow: it writes array_record, read back through `as_data_source` and grain.
Word count (for word-level perplexity): whitespace-separated tokens of the raw text, `len(text.split())`;
num_lines counts every line (blank ones too), so num_words + num_lines gives the convention that scores one
<eos> per line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
import zipfile
import zlib
from typing import Any, Iterable, Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from gateloop_jax import cli
from gateloop_jax.data import tokenizer as tok
from gateloop_jax.errors import ConfigError, MissingPathError

ARCHIVE = "wikitext-103-raw-v1.zip"
ARCHIVE_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
RAW_DIR = "wikitext-103-raw"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
SPLITS = tuple(SPLIT_FILES)
NAME = "wikitext103"
COMMAND = "python -m gateloop_jax.data.wikitext103"

HOW_TO_GET = (
    f"Get the official raw WikiText-103 archive {ARCHIVE} (Merity et al. 2016, {ARCHIVE_URL}) and put it, "
    f"unextracted, in the manual directory as MANUAL_DIR/{ARCHIVE} (or its extracted folder as "
    f"MANUAL_DIR/{RAW_DIR}/), then run: {COMMAND} --manual_dir MANUAL_DIR --data_dir DATA_DIR"
)


# ----------------------------------------------------------------------------------------------------------
# The raw archive


def find_archive(manual_dir: str) -> str:
    """Path of the raw data in `manual_dir`: the zip archive, or else the extracted folder. Validates it.

    Raises FileNotFoundError (nothing there) or ValueError (corrupt archive, missing split files), each naming
    the path and how to get the data.
    """
    manual_dir = os.path.expanduser(manual_dir)
    if not os.path.isdir(manual_dir):
        raise MissingPathError(
            f"WikiText-103 manual_dir {manual_dir} does not exist or is not a directory. {HOW_TO_GET}"
        )
    archive = os.path.join(manual_dir, ARCHIVE)
    folder = os.path.join(manual_dir, RAW_DIR)
    if os.path.exists(archive):
        _check_archive(archive)
        return archive
    if os.path.isdir(folder):
        missing = [f for f in SPLIT_FILES.values() if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise ConfigError(f"WikiText-103 folder {folder} lacks {missing}. {HOW_TO_GET}")
        return folder
    raise MissingPathError(f"Neither {archive} nor {folder}/ exists. {HOW_TO_GET}")


def _check_archive(archive: str) -> None:
    if not zipfile.is_zipfile(archive):
        raise ConfigError(f"{archive} is not a valid zip archive (corrupt or truncated download?). {HOW_TO_GET}")
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
    missing = [f"{RAW_DIR}/{f}" for f in SPLIT_FILES.values() if f"{RAW_DIR}/{f}" not in names]
    if missing:
        raise ConfigError(f"{archive} lacks {missing}: not the raw WikiText-103 archive. {HOW_TO_GET}")


def _raw_lines(path: str, split: str) -> Iterator[str]:
    """Lines of a split's raw file, each with its '\\n', from the zip archive or the extracted folder."""
    member = f"{RAW_DIR}/{SPLIT_FILES[split]}"
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, SPLIT_FILES[split]), encoding="utf-8", newline="") as f:
                yield from f
        else:
            with zipfile.ZipFile(path) as zf, io.TextIOWrapper(zf.open(member), encoding="utf-8", newline="") as f:
                yield from f
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as e:
        raise ConfigError(f"reading {member} from {path} failed ({e}): corrupt archive? {HOW_TO_GET}") from e


def is_title(line: str) -> bool:
    """A top-level article heading ' = Title = ' (sections are ' = = Section = = ')."""
    s = line.strip()
    return len(s) > 4 and s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def split_documents(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Groups raw lines into articles: yields (title, text), text being the article's lines verbatim.

    A new article starts at each title line; lines before the first title join the first article, so the
    concatenated texts reproduce the file byte for byte.
    """
    title, buffer = None, []
    for line in lines:
        if is_title(line) and title is not None:
            yield title, "".join(buffer)
            buffer = []
        if is_title(line):
            title = line.strip()[2:-2]
        buffer.append(line)
    if buffer:
        yield title or "", "".join(buffer)


# ----------------------------------------------------------------------------------------------------------
# The TFDS builder


class Wikitext103(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """WikiText-103 raw, one example {"title", "text"} per article, in file order (shuffling disabled).

    Not registered with TFDS: construct it directly, e.g. `Wikitext103(data_dir=..., file_format="array_record")`.
    """

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw WikiText-103 v1, one example per article."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET
    # TFDS looks up the builder's source path only to find a checksums file (there is none: the archive is the
    # user's). That lookup imports importlib_resources, which TFDS declares only for Python < 3.9, so it fails
    # on a clean install; a builder without a code path skips it.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="WikiText-103 (raw): 28k verified Good/Featured Wikipedia articles, untokenized.",
            features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}),
            # Evaluation concatenates articles in file order; keep that order on disk.
            disable_shuffling=True,
            homepage="https://www.salesforce.com/blog/the-wikitext-long-term-dependency-language-modeling-dataset/",
            citation="Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. arXiv:1609.07843, 2016.",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # TFDS's way of saying "no manual_dir given, or empty"
            manual_dir = None
        path = find_archive(os.fspath(manual_dir)) if manual_dir else os.fspath(dl_manager.download(ARCHIVE_URL))
        return {split: self._generate_examples(path, split) for split in SPLITS}

    def _generate_examples(self, path: str, split: str):
        for index, (title, text) in enumerate(split_documents(_raw_lines(path, split))):
            yield index, {"title": title, "text": text}


# ----------------------------------------------------------------------------------------------------------
# Paths, loading, statistics


def root_dir(data_dir: str) -> str:
    return os.path.join(os.path.expanduser(data_dir), NAME)


def tokenizer_path(data_dir: str, name: str) -> str:
    return os.path.join(root_dir(data_dir), name + ".model")


def tokens_path(data_dir: str, name: str, split: str) -> str:
    return os.path.join(root_dir(data_dir), name, f"{split}.npy")


def prepare_command(data_dir: str, *, vocab_size: int, model_type: str, byte_fallback: bool) -> str:
    """The exact command that makes what the pipeline needs for this configuration."""
    cmd = f"{COMMAND} --manual_dir MANUAL_DIR --data_dir {data_dir} --vocab_size {vocab_size}"
    if model_type != "bpe":
        cmd += f" --model_type {model_type}"
    if not byte_fallback:
        cmd += " --nobyte_fallback"
    return cmd + f"   (MANUAL_DIR holds {ARCHIVE})"


def documents(data_dir: str, split: str, *, read_threads: int = 2) -> grain.IterDataset:
    """The split's article texts (str), in file order, read by grain from the array_record files."""
    builder = Wikitext103(data_dir=os.path.expanduser(data_dir), file_format="array_record")
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


def split_statistics(data_dir: str, name: str, split: str, command: str) -> dict[str, int]:
    """{"num_words", "num_bytes", "num_lines", "num_documents", "num_tokens"} of a prepared split."""
    text_json = os.path.join(root_dir(data_dir), "statistics.json")
    token_json = os.path.join(root_dir(data_dir), name, "statistics.json")
    for path in (text_json, token_json):
        if not os.path.exists(path):
            raise MissingPathError(f"{path} does not exist: prepare the data with\n  {command}")
    return {**_read_json(text_json)[split], **_read_json(token_json)[split]}


# ----------------------------------------------------------------------------------------------------------
# Prepare


def prepare(
    data_dir: str,
    manual_dir: str | None = None,
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
    if manual_dir is not None:
        find_archive(manual_dir)  # fail before TFDS creates anything, with the clearer message
    data_dir = os.path.expanduser(data_dir)
    name = tok.tokenizer_name(vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback)
    seconds = {}

    t0 = time.perf_counter()
    builder = Wikitext103(data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
    builder.download_and_prepare(download_config=config)
    seconds["build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_json = os.path.join(root_dir(data_dir), "statistics.json")
    if not os.path.exists(text_json):
        _write_json(text_json, {s: text_statistics(documents(data_dir, s, read_threads=read_threads)) for s in SPLITS})
    seconds["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = tokenizer_path(data_dir, name)
    if not os.path.exists(model):
        sentences = (
            line for text in documents(data_dir, "train", read_threads=read_threads) for line in tok.text_lines(text)
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
    token_json = os.path.join(root_dir(data_dir), name, "statistics.json")
    if not os.path.exists(token_json):
        sp = tok.load(model)
        os.makedirs(os.path.dirname(token_json), exist_ok=True)
        counts = {}
        for split in SPLITS:
            stream = _encode_split(sp, documents(data_dir, split, read_threads=read_threads), read_threads)
            # uint16 halves the file (and the page cache) whenever the vocabulary fits.
            stream = stream.astype(np.uint16 if sp.get_piece_size() <= 2**16 else np.int32)
            path = tokens_path(data_dir, name, split)
            np.save(path + ".tmp.npy", stream)
            os.replace(path + ".tmp.npy", path)
            counts[split] = {"num_tokens": int(stream.size)}
        _write_json(token_json, counts)
    seconds["encode"] = time.perf_counter() - t0

    stats = {s: split_statistics(data_dir, name, s, COMMAND) for s in SPLITS}
    return {"statistics": stats, "seconds": seconds, "tokenizer": model}


def _encode_split(sp, texts: Iterable[str], num_threads: int, lines_per_call: int = 20_000) -> np.ndarray:
    """The token stream of some texts, in order (tokenizer.encode_text of each, concatenated). Shape (n,)."""
    parts, lines = [], []
    for text in texts:
        lines += tok.text_lines(text)
        if len(lines) >= lines_per_call:
            parts.append(tok.encode_lines(sp, lines, num_threads))
            lines = []
    parts.append(tok.encode_lines(sp, lines, num_threads))
    return np.concatenate(parts)


def check_args(args: argparse.Namespace) -> None:
    """The arguments' ranges and paths, before anything is built (ConfigError / MissingPathError naming them)."""
    for field in ("vocab_size", "input_sentence_size", "read_threads"):
        if getattr(args, field) < 1:
            raise ConfigError(f"--{field}={getattr(args, field)}: must be >= 1.")
    data_dir = os.path.expanduser(args.data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"--data_dir={args.data_dir!r} is an existing file; pass a directory (created if missing).")
    if args.manual_dir is not None:
        find_archive(args.manual_dir)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual_dir", default=None, help=f"directory holding {ARCHIVE}; omit to download it")
    parser.add_argument("--data_dir", required=True, help="where the dataset, tokenizer and token files go")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
    parser.add_argument("--nobyte_fallback", dest="byte_fallback", action="store_false")
    parser.add_argument("--input_sentence_size", type=int, default=2_000_000)
    parser.add_argument("--read_threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    check_args(args)
    summary = prepare(
        args.data_dir,
        args.manual_dir,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        byte_fallback=args.byte_fallback,
        input_sentence_size=args.input_sentence_size,
        read_threads=args.read_threads,
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run_argparse(main, prog=COMMAND)
