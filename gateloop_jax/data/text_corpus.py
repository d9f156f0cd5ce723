"""Your own corpus: a folder of UTF-8 .txt files (one document each) as a text task like WikiText-103.

    python -m gateloop_jax.data.text_corpus --manual_dir DIR --data_dir OUT [--vocab_size 8000]

makes, under OUT/text_corpus/, what the pipeline reads (text_prep.py's layout: TFDS array_record files with one
example {"title": relative path, "text": the file's text} per file, statistics, a SentencePiece tokenizer trained
on the train split, token streams and document ends). Then train with configs/text_corpus.py and
--config.data.data_dir=OUT. One corpus per OUT: the dataset is built once and reused.

Splits, by the first rule that applies:
  1. DIR has the folders train/, validation/ and test/: each split is the .txt files under its folder.
  2. Otherwise every .txt file under DIR (recursively) goes by a stable hash of its path relative to DIR:
     zlib.crc32(path as UTF-8) % 100 < 5 -> validation, < 10 -> test, else train (about 5% / 5% / 90%). A file
     keeps its split when files are added or removed.
Within a split, documents are in the order of their relative paths. Every file is checked before anything is
written: a missing or empty folder, no .txt file, a non-UTF-8 file or an empty split is one error naming it.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import tensorflow_datasets as tfds

from gateloop_jax import cli
from gateloop_jax.data import text_prep
from gateloop_jax.errors import ConfigError, MissingPathError

NAME = "text_corpus"
COMMAND = "python -m gateloop_jax.data.text_corpus"
SPLITS = text_prep.SPLITS
# SentencePiece pieces by default (configs/text_corpus.py's data.vocab_size): small enough for a corpus of a few
# megabytes, where 32000 pieces cannot be learned.
VOCAB_SIZE = 8000
# Hash buckets (of 100) of the held-out splits when DIR has no split folders.
HELD_OUT = {"validation": range(0, 5), "test": range(5, 10)}

HOW_TO = (
    f"Give {COMMAND} --manual_dir DIR a folder of UTF-8 .txt files (one document per file), either with the "
    "subfolders train/, validation/ and test/, or flat (split by a hash of each file's path, ~5% validation, "
    "~5% test)."
)


def split_of(relative_path: str) -> str:
    """The split of a file under rule 2 of the module docstring."""
    bucket = zlib.crc32(relative_path.replace(os.sep, "/").encode("utf-8")) % 100
    return next((split for split, buckets in HELD_OUT.items() if bucket in buckets), "train")


def _txt_files(folder: str, root: str) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.relpath(os.path.join(parent, f), root) for f in files if f.endswith(".txt")]
    return sorted(found)


def find_files(manual_dir: str) -> dict[str, list[str]]:
    """{split: [path relative to manual_dir, ...]} by the module docstring's rules, every file checked as UTF-8.

    Raises MissingPathError (no folder, no .txt file) or ConfigError (a non-UTF-8 file, an empty split),
    naming the path.
    """
    root = os.path.expanduser(manual_dir)
    if not os.path.isdir(root):
        raise MissingPathError(f"text_corpus manual_dir {root} does not exist or is not a directory. {HOW_TO}")
    folders = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if folders:
        missing = [s for s in SPLITS if s not in folders]
        if missing:
            raise MissingPathError(
                f"text_corpus manual_dir {root} has the split folder(s) {folders} but not {missing}: give all of "
                f"train/, validation/ and test/, or none (then files are split by a hash of their path). {HOW_TO}"
            )
        splits = {s: _txt_files(os.path.join(root, s), root) for s in SPLITS}
        for s, files in splits.items():
            if not files:
                raise MissingPathError(f"text_corpus split folder {os.path.join(root, s)} has no .txt file. {HOW_TO}")
    else:
        files = _txt_files(root, root)
        if not files:
            raise MissingPathError(f"text_corpus manual_dir {root} has no .txt file (searched recursively). {HOW_TO}")
        splits = {s: [f for f in files if split_of(f) == s] for s in SPLITS}
        for s, chosen in splits.items():
            if not chosen:
                raise ConfigError(
                    f"text_corpus: no file of the {len(files)} .txt files under {root} falls in the {s} split "
                    f"(buckets {HELD_OUT.get(s, 'the rest')} of crc32(path) % 100): add files, or give the folders "
                    "train/, validation/ and test/."
                )
    for files in splits.values():
        for f in files:
            _read(root, f)
    return splits


def _read(root: str, relative_path: str) -> str:
    path = os.path.join(root, relative_path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"text_corpus: {path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, e.g. "
            f"iconv -f LATIN1 -t UTF-8, or remove it."
        ) from e


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A folder of .txt files, one example {"title", "text"} per file, in path order (shuffling disabled)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per .txt file."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO
    code_path = None  # as Wikitext103: no checksums file to look up

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A user's folder of UTF-8 .txt files, one document per file.",
            features=tfds.features.FeaturesDict({"title": tfds.features.Text(), "text": tfds.features.Text()}),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(root, files) for split, files in find_files(root).items()}

    def _generate_examples(self, root: str, files: list[str]):
        for index, relative_path in enumerate(files):
            yield index, {"title": relative_path, "text": _read(root, relative_path)}


def builder(data_dir: str) -> TextCorpus:
    return TextCorpus(data_dir=os.path.expanduser(data_dir), file_format="array_record")


def prepare_command(data_dir: str, *, vocab_size: int, model_type: str, byte_fallback: bool) -> str:
    """The exact command that makes what the pipeline needs for this configuration."""
    flags = text_prep.command_flags(vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback)
    return f"{COMMAND} --manual_dir DIR --data_dir {data_dir}{flags}   (DIR: your folder of .txt files)"


def prepare(data_dir: str, manual_dir: str, *, vocab_size: int = VOCAB_SIZE, **tokenizer_kwargs) -> dict[str, Any]:
    """Checks manual_dir (find_files), then builds the dataset, statistics, tokenizer and token files (if missing).

    tokenizer_kwargs: vocab_size, model_type, byte_fallback, input_sentence_size, read_threads (text_prep.prepare).
    """
    find_files(manual_dir)  # every error before TFDS writes anything
    config = tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir))
    return text_prep.prepare(builder(data_dir), data_dir, config, vocab_size=vocab_size, **tokenizer_kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--manual_dir", required=True, help="the folder of .txt files (see the splitting rules)")
    text_prep.add_tokenizer_arguments(parser, vocab_size=VOCAB_SIZE)
    args = parser.parse_args(argv)
    text_prep.check_tokenizer_args(args)
    summary = prepare(args.data_dir, args.manual_dir, **text_prep.tokenizer_kwargs(args))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run_argparse(main, prog=COMMAND)
