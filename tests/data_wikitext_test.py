"""WikiText-103 on the fixture: builder, statistics, tokenizer, both packings, eval coverage, resume, bad input."""

import json
import os
import re
import zipfile

import numpy as np
import pytest

from gateloop_jax import data
from gateloop_jax.data import pipeline
from gateloop_jax.data import tokenizer as tok
from gateloop_jax.data import wikitext103 as wt

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "wikitext-103", "wikitext-103-raw")
VOCAB = 400  # the fixture has ~70 distinct characters; byte fallback adds 256 pieces + 4 specials (<eod> too)
SEQ_LEN = 64
# Articles per split, as written in tests/fixtures/wikitext-103/make_fixture.py.
DOCUMENTS = {"train": 6, "validation": 2, "test": 2}


def raw_text(split):
    with open(os.path.join(FIXTURE, wt.SPLIT_FILES[split]), encoding="utf-8", newline="") as f:
        return f.read()


def make_archive(directory, members=None):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, wt.ARCHIVE)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in members or wt.SPLIT_FILES.values():
            zf.write(os.path.join(FIXTURE, name), f"{wt.RAW_DIR}/{name}")
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wikitext")
    make_archive(str(tmp / "manual"))
    wt.prepare(str(tmp / "data"), str(tmp / "manual"), vocab_size=VOCAB)
    c = data.default_config("wikitext103")
    c.data_dir, c.vocab_size, c.seq_len = str(tmp / "data"), VOCAB, SEQ_LEN
    assert c.packing == "documents"  # the documented default
    return c


@pytest.fixture(scope="module")
def stream(config):
    c = data.default_config("wikitext103")
    c.update(config.to_dict())
    c.packing = "stream"
    return c


def tokens(config, split):
    return np.asarray(pipeline.load_tokens(config, split)).astype(np.int64)


# --- builder and statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("split", wt.SPLITS)
def test_builder_keeps_articles_in_order_byte_for_byte(config, split):
    texts = list(wt.documents(config.data_dir, split))
    assert len(texts) == DOCUMENTS[split]
    assert "".join(texts) == raw_text(split)
    assert all(wt.is_title(t.split("\n")[1 if i == 0 else 0]) for i, t in enumerate(texts))


@pytest.mark.parametrize("split", wt.SPLITS)
def test_split_statistics(config, stream, split):
    raw = raw_text(split)
    # Scored tokens: the stream's, plus one <eod> per document when packing documents.
    assert data.split_statistics(config, split)["num_tokens"] == len(tokens(config, split)) + DOCUMENTS[split]
    stats = data.split_statistics(stream, split)
    assert stats["num_words"] == len(raw.split())
    assert stats["num_bytes"] == os.path.getsize(os.path.join(FIXTURE, wt.SPLIT_FILES[split]))
    assert stats["num_lines"] == raw.count("\n")
    assert stats["num_documents"] == DOCUMENTS[split]
    assert stats["num_tokens"] == len(tokens(config, split))


def test_fixture_figures(config):
    # The figures the fixture was written to have (words: whitespace-separated tokens).
    words = {s: data.split_statistics(config, s)["num_words"] for s in wt.SPLITS}
    assert words == {"train": 1364, "validation": 171, "test": 170}


@pytest.mark.parametrize("split", wt.SPLITS)
def test_token_stream_is_the_encoded_lines(config, split):
    sp = data.load_tokenizer(config)
    expected = []
    for line in raw_text(split).split("\n"):
        if line.strip():
            expected += sp.encode(line.strip()) + [sp.eos_id()]
    np.testing.assert_array_equal(tokens(config, split), expected)
    assert data.vocab_size(config) == VOCAB
    # Identity normalisation and byte fallback: decoding gives the text back (whitespace aside).
    assert sp.decode(sp.encode(raw_text(split).split("\n")[1].strip())) == raw_text(split).split("\n")[1].strip()


# --- packing, eval coverage, training order, resume ------------------------------------------------------


def window_index(p, process_count, batch, row, local):
    """Global window index of row `row` of local batch `batch` on process p (round-robin dealing)."""
    return p + process_count * (batch * local + row)


@pytest.mark.parametrize("split", ["validation", "test"])
@pytest.mark.parametrize("process_count,batch_size", [(1, 4), (2, 4), (4, 8)])
def test_stream_eval_covers_every_token_exactly_once(stream, split, process_count, batch_size):
    config = stream
    local = batch_size // process_count
    windows = {}
    counts = set()
    for p in range(process_count):
        batches = list(
            data.eval_batches(config, split=split, batch_size=batch_size, process_index=p, process_count=process_count)
        )
        counts.add(len(batches))
        for k, b in enumerate(batches):
            assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (local, SEQ_LEN)
            assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["mask"].dtype == np.float32
            for r in range(local):
                windows[window_index(p, process_count, k, r, local)] = {key: v[r] for key, v in b.items()}
    assert len(counts) == 1  # every process runs the same number of eval steps
    ordered = [windows[j] for j in range(len(windows))]
    targets = np.concatenate([w["targets"][w["mask"] == 1] for w in ordered])
    np.testing.assert_array_equal(targets, tokens(config, split))
    stream = np.concatenate([[1], tokens(config, split)])  # [BOS] + tokens
    inputs = np.concatenate([w["inputs"][w["mask"] == 1] for w in ordered])
    np.testing.assert_array_equal(inputs, stream[:-1])
    for w in ordered:  # padding is all zeros, and only at the end of a window
        n = int(w["mask"].sum())
        assert (w["mask"][:n] == 1).all() and not w["targets"][n:].any() and not w["inputs"][n:].any()
    # Re-iterable, identical on the second pass.
    again = data.eval_batches(config, split=split, batch_size=batch_size, process_count=process_count)
    first, second = list(again), list(again)
    assert all((a["targets"] == b["targets"]).all() for a, b in zip(first, second))


def documents_of(config, split):
    """Each article's tokens by the encoding rule, encoded here from the builder's texts."""
    sp = data.load_tokenizer(config)
    return [list(tok.encode_text(sp, text)) for text in wt.documents(config.data_dir, split)]


def test_documents_window_by_hand():
    # Documents [10, 11], [] and [12, 13, 14]: T = 10 11 <eod> <eod> 12 13 14 <eod>, windows of 3.
    packed = pipeline.Documents(np.array([10, 11, 12, 13, 14]), np.array([2, 2, 5]))
    E, B = tok.EOD_ID, tok.BOS_ID
    expected = [
        dict(inputs=[B, 10, 11], targets=[10, 11, E], segment_ids=[1, 1, 1], mask=[1, 1, 1]),
        dict(inputs=[B, B, 12], targets=[E, 12, 13], segment_ids=[1, 2, 2], mask=[1, 1, 1]),
        dict(inputs=[13, 14, 0], targets=[14, E, 0], segment_ids=[1, 1, 0], mask=[1, 1, 0]),
        dict(inputs=[0, 0, 0], targets=[0, 0, 0], segment_ids=[0, 0, 0], mask=[0, 0, 0]),
    ]
    assert packed.size == 8
    for j, e in enumerate(expected):
        w = packed.window(j, 3)
        assert {k: w[k].tolist() for k in e} == e, j
        assert w["segment_ids"].dtype == np.int32 and w["mask"].dtype == np.float32


@pytest.mark.parametrize("split", ["validation", "test"])
@pytest.mark.parametrize("process_count,batch_size", [(1, 4), (2, 4)])
def test_documents_eval_scores_every_document_once(config, split, process_count, batch_size):
    local = batch_size // process_count
    windows = {}
    for p in range(process_count):
        batches = data.eval_batches(config, split=split, batch_size=batch_size, process_index=p,
                                    process_count=process_count)
        for k, b in enumerate(batches):
            assert set(b) == {"inputs", "targets", "mask", "segment_ids"} and b["segment_ids"].dtype == np.int32
            for r in range(local):
                windows[window_index(p, process_count, k, r, local)] = {key: v[r] for key, v in b.items()}
    ordered = [windows[j] for j in range(len(windows))]
    docs = documents_of(config, split)
    assert len(docs) == DOCUMENTS[split]
    real = np.concatenate([w["mask"] for w in ordered]) == 1
    # The metrics' token count is the number of scored positions: every token and one <eod> per document.
    assert real.sum() == data.split_statistics(config, split)["num_tokens"] == sum(len(d) + 1 for d in docs)
    # Read on its own, each document is BOS doc -> doc <eod>; in order, those fill the windows' real positions.
    targets = np.concatenate([w["targets"] for w in ordered])[real]
    inputs = np.concatenate([w["inputs"] for w in ordered])[real]
    np.testing.assert_array_equal(targets, np.concatenate([d + [tok.EOD_ID] for d in docs]))
    np.testing.assert_array_equal(inputs, np.concatenate([[tok.BOS_ID] + d for d in docs]))
    for w in ordered:
        n = int(w["mask"].sum())
        assert (w["mask"][:n] == 1).all() and not w["segment_ids"][n:].any() and not w["targets"][n:].any()
        # Ids: 1 at the window's start, +1 at each later document start (input BOS), so <eod> ends a segment.
        starts = w["inputs"][:n] == tok.BOS_ID
        starts[:1] = True
        np.testing.assert_array_equal(w["segment_ids"][:n], np.cumsum(starts))
        eod = np.flatnonzero(w["targets"][: n - 1] == tok.EOD_ID)
        assert (w["segment_ids"][eod + 1] == w["segment_ids"][eod] + 1).all()


def test_documents_training_epoch_is_a_permutation_of_all_windows(config):
    packed = pipeline.Documents(pipeline.load_tokens(config, "train"), pipeline.load_ends(config, "train"))
    num = -(-packed.size // SEQ_LEN)
    it = data.train_iterator(config, global_batch_size=4, seed=3)
    epoch = rows([next(it) for _ in range(-(-num // 4))])[:num]
    windows = rows([{k: v[None] for k, v in packed.window(j, SEQ_LEN).items()} for j in range(num)])
    assert sorted(epoch) == sorted(windows)  # no window lost or duplicated
    assert epoch != windows  # and shuffled


def test_unknown_packing_names_the_field(config):
    other = data.default_config("wikitext103")
    other.update(config.to_dict())
    other.packing = "bogus"
    with pytest.raises(ValueError, match=r"data.packing='bogus' is not one of \('documents', 'stream'\)"):
        data.vocab_size(other)


def rows(batches):
    keys = ("inputs", "targets", "mask", "segment_ids")
    return [
        tuple(np.concatenate([b[k][r] for k in keys if k in b]))
        for b in batches
        for r in range(len(b["inputs"]))
    ]


def test_stream_training_epoch_is_a_permutation_of_all_windows(stream):
    config = stream
    n = len(tokens(config, "train"))
    num = -(-n // SEQ_LEN)
    it = data.train_iterator(config, global_batch_size=4, seed=3)
    epoch = rows([next(it) for _ in range(-(-num // 4))])[:num]
    train = tokens(config, "train")
    windows = rows([{k: v[None] for k, v in pipeline.window(train, j, SEQ_LEN).items()} for j in range(num)])
    assert sorted(epoch) == sorted(windows)  # no window lost or duplicated
    assert epoch != windows  # and shuffled
    # Every training token appears exactly as often as in the split (multiset).
    got = np.concatenate([np.asarray(r[SEQ_LEN : 2 * SEQ_LEN])[np.asarray(r[2 * SEQ_LEN :]) == 1] for r in epoch])
    np.testing.assert_array_equal(np.sort(got), np.sort(tokens(config, "train")))


@pytest.mark.parametrize("packing", pipeline.PACKINGS)
def test_training_shards_deal_the_global_batch(config, stream, packing):
    config = config if packing == "documents" else stream
    whole = data.train_iterator(config, global_batch_size=4, seed=5)
    shards = [
        data.train_iterator(config, global_batch_size=4, seed=5, process_index=p, process_count=2) for p in range(2)
    ]
    for _ in range(6):
        g = rows([next(whole)])
        parts = [rows([next(s)]) for s in shards]
        assert [parts[j % 2][j // 2] for j in range(4)] == g


def test_train_resume_is_exact(config):
    it = data.train_iterator(config, global_batch_size=4, seed=0)
    for _ in range(9):  # past the end of the first epoch (17 windows)
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    fresh = data.train_iterator(config, global_batch_size=4, seed=0)
    fresh.set_state(state)
    for e in expected:
        b = next(fresh)
        for k in e:
            np.testing.assert_array_equal(b[k], e[k])


# --- bad input --------------------------------------------------------------------------------------------


def test_missing_manual_dir(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + ".*wikitext-103-raw-v1.zip"):
        wt.prepare(str(tmp_path / "data"), missing)


def test_manual_dir_without_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / wt.ARCHIVE))):
        wt.prepare(str(tmp_path / "data"), str(tmp_path))


def test_corrupt_archive(tmp_path):
    (tmp_path / wt.ARCHIVE).write_bytes(b"PK\x03\x04 this is not really a zip archive")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / wt.ARCHIVE)) + " is not a valid zip"):
        wt.prepare(str(tmp_path / "data"), str(tmp_path))


def test_archive_missing_a_split(tmp_path):
    make_archive(str(tmp_path), members=["wiki.train.raw", "wiki.valid.raw"])
    with pytest.raises(ValueError, match="lacks.*wiki.test.raw.*" + re.escape(wt.ARCHIVE_URL)):
        wt.prepare(str(tmp_path / "data"), str(tmp_path))


def test_missing_tokenizer_names_the_command(config):
    other = data.default_config("wikitext103")
    other.data_dir, other.vocab_size = config.data_dir, 999
    command = (
        f"python -m gateloop_jax.data.wikitext103 --manual_dir MANUAL_DIR --data_dir {config.data_dir} --vocab_size 999"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(command)):
        data.vocab_size(other)
    with pytest.raises(FileNotFoundError, match=re.escape(command)):
        data.train_iterator(other, global_batch_size=2, seed=0)


def test_indivisible_batch_names_the_field(config):
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by process_count=4"):
        data.train_iterator(config, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="batch_size=3 is not divisible"):
        data.eval_batches(config, split="test", batch_size=3, process_count=2)
