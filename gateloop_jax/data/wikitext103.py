"""WikiText-103 (raw): a TFDS builder writing array_record, the prepare step, and its command line.

One command prepares everything the pipeline reads (dataset, statistics, tokenizer, token files):

    python -m gateloop_jax.data.wikitext103 --manual_dir DIR --data_dir DATA_DIR [--vocab_size 32000]

DIR holds the official raw archive wikitext-103-raw-v1.zip (unextracted, or its extracted folder
wikitext-103-raw/). Without --manual_dir the archive is downloaded from ARCHIVE_URL (needs network).
Everything lands under DATA_DIR/wikitext103/ in text_prep.py's layout (TFDS array_record files with one example
per article, statistics, tokenizer, token streams and document ends); each step is skipped when its output exists.
The builder needs no TensorFlow: it writes array_record, read back through `as_data_source` and grain.
num_words + num_lines gives the convention that scores one <eos> per line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import zipfile
import zlib
from typing import Any, Iterable, Iterator

import grain
import tensorflow_datasets as tfds

from gateloop_jax import cli
from gateloop_jax.data import text_prep
from gateloop_jax.errors import ConfigError, MissingPathError

ARCHIVE = "wikitext-103-raw-v1.zip"
ARCHIVE_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"
RAW_DIR = "wikitext-103-raw"
SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
SPLITS = text_prep.SPLITS
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
# Prepare (the steps after the builder are text_prep's, shared with every text task)


def builder(data_dir: str) -> Wikitext103:
    return Wikitext103(data_dir=os.path.expanduser(data_dir), file_format="array_record")


def prepare_command(data_dir: str, *, vocab_size: int, model_type: str, byte_fallback: bool) -> str:
    """The exact command that makes what the pipeline needs for this configuration."""
    flags = text_prep.command_flags(vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback)
    return f"{COMMAND} --manual_dir MANUAL_DIR --data_dir {data_dir}{flags}   (MANUAL_DIR holds {ARCHIVE})"


def documents(data_dir: str, split: str, *, read_threads: int = 2) -> grain.IterDataset:
    """The split's article texts (str), in file order, read by grain from the array_record files."""
    return text_prep.documents(builder(data_dir), split, read_threads=read_threads)


def prepare(data_dir: str, manual_dir: str | None = None, **tokenizer_kwargs) -> dict[str, Any]:
    """Builds the dataset, its statistics, the tokenizer and the token files (each only if missing).

    tokenizer_kwargs: vocab_size, model_type, byte_fallback, input_sentence_size, read_threads (text_prep.prepare).
    Returns a summary: the split statistics and seconds spent per step (0 for steps skipped).
    """
    if manual_dir is not None:
        find_archive(manual_dir)  # fail before TFDS creates anything, with the clearer message
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
    return text_prep.prepare(builder(data_dir), data_dir, config, **tokenizer_kwargs)


def check_args(args: argparse.Namespace) -> None:
    """The arguments' ranges and paths, before anything is built (ConfigError / MissingPathError naming them)."""
    text_prep.check_tokenizer_args(args)
    if args.manual_dir is not None:
        find_archive(args.manual_dir)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual_dir", default=None, help=f"directory holding {ARCHIVE}; omit to download it")
    text_prep.add_tokenizer_arguments(parser)
    args = parser.parse_args(argv)
    check_args(args)
    summary = prepare(args.data_dir, args.manual_dir, **text_prep.tokenizer_kwargs(args))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run_argparse(main, prog=COMMAND)
