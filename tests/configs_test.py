"""Every config in configs/ loads, is locked, has the cadence fields, and runs two steps at test size."""

import glob
import os
import zipfile

import ml_collections
import numpy as np
import pytest

from gateloop_jax.data import wikitext103 as wt
from gateloop_jax.train import train_and_evaluate
from gateloop_jax.train.metrics import read_jsonl
from train_test import ROOT, get_config  # noqa: F401 - also sets the compilation cache

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "wikitext-103", "wikitext-103-raw")


def test_the_task_configs_are_all_here():
    assert CONFIGS == ["memory_horizon", "mqar", "text_corpus", "wikitext103"]


@pytest.fixture(scope="module")
def wikitext_dir(tmp_path_factory):
    """The WikiText fixture prepared like the real data (a 400-piece tokenizer)."""
    tmp = tmp_path_factory.mktemp("wikitext")
    os.makedirs(tmp / "manual")
    with zipfile.ZipFile(tmp / "manual" / wt.ARCHIVE, "w") as zf:
        for name in wt.SPLIT_FILES.values():
            zf.write(os.path.join(FIXTURE, name), f"{wt.RAW_DIR}/{name}")
    wt.prepare(str(tmp / "data"), str(tmp / "manual"), vocab_size=400)
    return str(tmp / "data")


@pytest.fixture(scope="module")
def text_corpus_dir(tmp_path_factory):
    """The WikiText fixture's articles as a folder of .txt files, prepared like a user's corpus."""
    from data_text_corpus_test import write_folder
    from gateloop_jax.data import text_corpus

    tmp = tmp_path_factory.mktemp("text_corpus")
    write_folder(str(tmp / "txt"))
    text_corpus.prepare(str(tmp / "data"), str(tmp / "txt"), vocab_size=400)
    return str(tmp / "data")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_fields_and_locking(name):
    for arg in (None, "runlocal", "test", "variant=transformer", "variant=fixed,runlocal"):
        c = get_config(name, arg)
        assert isinstance(c, ml_collections.ConfigDict) and c.is_locked
        for field in ("total_steps", "log_every_steps", "eval_every_steps", "ckpt_every_steps", "keep_ckpts",
                      "mesh", "axis_rules", "model", "data", "optimizer", "seed"):
            assert field in c, field
        assert c.data.name == name
    with pytest.raises(AttributeError, match="no_such_field"):
        c.no_such_field = 1
    with pytest.raises(AttributeError, match="no_such_field"):
        c.model.no_such_field = 1
    with pytest.raises(ValueError, match=r"unknown key 'bogus'"):
        get_config(name, "bogus=1")
    with pytest.raises(ValueError, match="variant='nope'"):
        get_config(name, "variant=nope")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains_two_steps_at_test_size(name, tmp_path, request):
    c = get_config(name, "test")
    if name in ("wikitext103", "text_corpus"):
        c.data.data_dir = request.getfixturevalue("wikitext_dir" if name == "wikitext103" else "text_corpus_dir")
        c.data.vocab_size = 400
    c.mesh.update(data=-1)
    result = train_and_evaluate(c, str(tmp_path))
    lines = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2]
    assert result["step"] == 2 and np.isfinite(result["eval/loss"])
    if name in ("wikitext103", "text_corpus"):
        assert "eval/word_ppl" in result and "eval/bits_per_byte" in result
