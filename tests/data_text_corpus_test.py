"""text_corpus: a folder of .txt files -> the text pipeline (splits, packing, exact eval), training, bad input."""

import os
import re
import zlib

import numpy as np
import pytest

from gateloop_jax import data
from gateloop_jax.data import text_corpus as tc
from gateloop_jax.data import tokenizer as tok
from gateloop_jax.data import wikitext103 as wt
from gateloop_jax.train import train_and_evaluate
from train_test import get_config  # noqa: F401 - also sets the compilation cache

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "wikitext-103", "wikitext-103-raw")
VOCAB = 400  # as for the WikiText fixture, whose articles are the files here


def articles(split):
    with open(os.path.join(FIXTURE, wt.SPLIT_FILES[split]), encoding="utf-8", newline="") as f:
        return [text for _, text in wt.split_documents(f)]


def write_folder(root):
    """The fixture's articles as train/ validation/ test/ files, one per article (a nested one in train/)."""
    files = {}
    for split in tc.SPLITS:
        for i, text in enumerate(articles(split)):
            name = os.path.join(split, "part" if i == 0 and split == "train" else "", f"article{i}.txt")
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
            files.setdefault(split, []).append((name, text))
    return {s: sorted(fs) for s, fs in files.items()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    files = write_folder(str(tmp / "txt"))
    tc.main(["--manual_dir", str(tmp / "txt"), "--data_dir", str(tmp / "data"), "--vocab_size", str(VOCAB)])
    c = data.default_config("text_corpus")
    c.data_dir, c.vocab_size, c.seq_len = str(tmp / "data"), VOCAB, 32
    return c, files


def test_documents_are_the_files_in_path_order(corpus):
    config, files = corpus
    for split in tc.SPLITS:
        builder = tc.builder(config.data_dir)
        examples = list(builder.as_data_source(split=split))
        assert [e["title"].decode() for e in examples] == [name for name, _ in files[split]]
        assert [e["text"].decode() for e in examples] == [text for _, text in files[split]]
        stats = data.split_statistics(config, split)
        joined = "".join(text for _, text in files[split])
        assert (stats["num_documents"], stats["num_words"]) == (len(files[split]), len(joined.split()))
        assert stats["num_bytes"] == len(joined.encode("utf-8"))


@pytest.mark.parametrize("split", tc.SPLITS)
def test_eval_scores_every_token_once(corpus, split):
    config, files = corpus
    sp = data.load_tokenizer(config)
    docs = [list(tok.encode_text(sp, text)) for _, text in files[split]]
    batches = list(data.eval_batches(config, split=split, batch_size=4))
    real = np.concatenate([b["mask"].ravel() for b in batches]) == 1
    assert real.sum() == data.split_statistics(config, split)["num_tokens"] == sum(len(d) + 1 for d in docs)
    targets = np.concatenate([b["targets"].ravel() for b in batches])[real]
    np.testing.assert_array_equal(targets, np.concatenate([d + [tok.EOD_ID] for d in docs]))
    segments = np.concatenate([b["segment_ids"].ravel() for b in batches])
    assert (segments[real] >= 1).all() and not segments[~real].any()


def test_trains_two_steps_with_the_config(corpus, tmp_path):
    config, _ = corpus
    c = get_config("text_corpus", "test")
    c.data.update(data_dir=config.data_dir, vocab_size=VOCAB)
    c.mesh.update(data=-1)
    result = train_and_evaluate(c, str(tmp_path))
    assert result["step"] == 2 and np.isfinite(result["eval/loss"])
    assert {"eval/word_ppl", "eval/bits_per_byte", "eval/ppl"} <= set(result)


def test_hash_split_rule(tmp_path):
    names = [f"doc{i:03d}.txt" for i in range(40)]
    for name in names:
        (tmp_path / name).write_text(f"document {name}\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a document", encoding="utf-8")
    splits = tc.find_files(str(tmp_path))
    # The documented rule, computed here: crc32 of the relative path, buckets 0-4 validation, 5-9 test.
    bucket = {n: zlib.crc32(n.encode()) % 100 for n in names}
    assert splits["validation"] == [n for n in names if bucket[n] < 5] == ["doc032.txt"]
    assert splits["test"] == [n for n in names if 5 <= bucket[n] < 10] == ["doc005.txt", "doc035.txt"]
    assert sorted(sum(splits.values(), [])) == names


# --- bad input: one error naming the path, before anything is written -----------------------------------------


def bad(tmp_path, error, pattern):
    out = tmp_path / "out"
    with pytest.raises(error, match=pattern):
        tc.prepare(str(out), str(tmp_path / "txt"), vocab_size=VOCAB)
    assert not out.exists()


def test_missing_folder(tmp_path):
    bad(tmp_path, FileNotFoundError, re.escape(str(tmp_path / "txt")) + " does not exist")


def test_empty_folder_and_no_txt(tmp_path):
    (tmp_path / "txt").mkdir()
    bad(tmp_path, FileNotFoundError, re.escape(str(tmp_path / "txt")) + " has no .txt file")
    (tmp_path / "txt" / "readme.md").write_text("hello", encoding="utf-8")
    bad(tmp_path, FileNotFoundError, re.escape(str(tmp_path / "txt")) + " has no .txt file")


def test_non_utf8_file(tmp_path):
    write_folder(str(tmp_path / "txt"))
    (tmp_path / "txt" / "validation" / "latin1.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    bad(tmp_path, ValueError, re.escape(str(tmp_path / "txt" / "validation" / "latin1.txt")) + " is not UTF-8")


def test_split_folders_incomplete_or_empty(tmp_path):
    write_folder(str(tmp_path / "txt"))
    for f in os.listdir(tmp_path / "txt" / "test"):
        os.remove(tmp_path / "txt" / "test" / f)
    bad(tmp_path, FileNotFoundError, re.escape(str(tmp_path / "txt" / "test")) + " has no .txt file")
    os.rmdir(tmp_path / "txt" / "test")
    bad(tmp_path, FileNotFoundError, r"has the split folder\(s\) \['train', 'validation'\] but not \['test'\]")


def test_hash_split_left_empty(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "only.txt").write_text("one document", encoding="utf-8")
    bad(tmp_path, ValueError, r"no file of the 1 \.txt files under .* falls in the (validation|test) split")


def test_vocab_too_large_for_the_corpus_names_the_flags(corpus):
    config, _ = corpus
    # The dataset is built already: only the tokenizer is trained, and refused.
    manual_dir = os.path.join(os.path.dirname(config.data_dir), "txt")
    with pytest.raises(ValueError, match=r"vocab_size=8000 is more pieces .*\(at most \d+\): pass a smaller --vocab"):
        tc.prepare(config.data_dir, manual_dir, vocab_size=8000)
