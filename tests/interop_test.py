"""Export / import, gateloop_jax.load of an export, the profiler hook and evaluate, on a tiny model trained on the
WikiText fixture (3 steps, so the parameters are trained ones, not the initialisation).

Tolerances: a float32 export stores the very parameters of the checkpoint, so its logits are compared for equality;
everything else is stated where it is checked.
"""

import glob
import json
import os

import jax
import numpy as np
import pytest

import gateloop_jax
from gateloop_jax import export as export_lib
from gateloop_jax.train import train_and_evaluate
from gateloop_jax.train.metrics import read_jsonl
from configs_test import FIXTURE, wikitext_dir  # noqa: F401 - the prepared fixture (a module fixture)
from train_test import get_config

# The tests share one trained workdir: one xdist worker runs them all, so it trains once.
pytestmark = pytest.mark.xdist_group("interop_trained")
TOKENS = np.array([[1, 40, 41, 42, 2, 50, 60, 70, 80, 90, 3], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], np.int32)


def wikitext_config(data_dir, steps=3):
    c = get_config("wikitext103", "test")
    c.data.data_dir = data_dir
    c.data.vocab_size = 400
    c.total_steps = steps
    c.eval_every_steps = steps
    c.ckpt_every_steps = steps
    c.mesh.update(data=1)
    c.global_batch_size = c.eval_batch_size = 2
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory, wikitext_dir):  # noqa: F811 - the fixture imported above
    """A workdir trained 3 steps, with a profiler trace of step 2."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    c = wikitext_config(wikitext_dir)
    c.profile_steps = (2, 1)
    train_and_evaluate(c, workdir)
    return workdir


def test_profile_steps_writes_a_trace(trained):
    files = glob.glob(os.path.join(trained, "profile", "plugins", "profile", "*", "*"))
    names = {os.path.basename(f) for f in files}
    assert any(n.endswith(".xplane.pb") for n in names), names  # TensorBoard's profile plugin reads these
    assert any(n.endswith(".trace.json.gz") for n in names), names  # Perfetto / chrome://tracing


def test_profile_steps_bad_value_raises_before_compiling(tmp_path, monkeypatch):
    c = get_config()
    c.profile_steps = (0, 3)
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    with pytest.raises(ValueError, match=r"profile_steps=\(0, 3\) must be START,COUNT"):
        train_and_evaluate(c, str(tmp_path))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_lib.export(trained, str(tmp_path_factory.mktemp("export")))


def test_export_files_and_names(exported, trained):
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(exported, "model.safetensors"))
    assert {"embed.embedding", "final_norm.scale", "blocks.0.mixer.q_proj.kernel"} <= set(tensors)
    assert all(v.dtype == np.float32 for v in tensors.values())
    info = json.load(open(os.path.join(exported, "config.json")))
    assert info["step"] == 3 and info["model"]["vocab_size"] == 400 and info["tokenizer"]["bos_id"] == 1
    assert info["num_params"] == sum(v.size for v in tensors.values())
    card = open(os.path.join(exported, "README.md")).read()
    eval_loss = [m for m in read_jsonl(os.path.join(trained, "metrics.jsonl")) if "eval/loss" in m][-1]["eval/loss"]
    assert f"{info['num_params']:,}" in card and f"{eval_loss:.6g}" in card and "3 optimizer steps" in card


def test_export_loads_to_the_same_logits(exported, trained):
    model, config, tok = gateloop_jax.load(trained)
    model2, config2, tok2 = gateloop_jax.load(exported)
    assert config2.data.seq_len == config.data.seq_len
    assert tok2.encode("The game") == tok.encode("The game")
    np.testing.assert_array_equal(np.asarray(model2(TOKENS)), np.asarray(model(TOKENS)))


def test_bfloat16_export_rounds_the_parameters(trained, tmp_path):
    from flax import nnx

    out = export_lib.export(trained, str(tmp_path / "bf16"), dtype="bfloat16")
    model, _, _ = gateloop_jax.load(trained)
    model2, _, _ = gateloop_jax.load(out)
    ref = export_lib.flatten_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    got = export_lib.flatten_params(nnx.to_pure_dict(nnx.state(model2, nnx.Param)))
    for name, value in ref.items():
        assert got[name].dtype == np.float32
        # Exactly the float32 parameters rounded to bfloat16 (and widened back on load).
        np.testing.assert_array_equal(np.asarray(got[name]),
                                      np.asarray(value).astype(jax.numpy.bfloat16).astype(np.float32))


def test_import_then_fine_tune_starts_from_the_exported_parameters(exported, trained, wikitext_dir, tmp_path):  # noqa: F811
    imported = str(tmp_path / "imported")
    export_lib.main(["import", "--from", exported, "--workdir", imported])
    model, _, _ = gateloop_jax.load(trained)
    model2, _, _ = gateloop_jax.load(imported)
    np.testing.assert_array_equal(np.asarray(model2(TOKENS)), np.asarray(model(TOKENS)))

    # init_from the import and init_from the original workdir: the same parameters, hence the same first losses.
    def first_losses(source, workdir):
        c = wikitext_config(wikitext_dir, steps=2)
        c.init_from = source
        train_and_evaluate(c, workdir)
        return [m["train/loss"] for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in m]

    from_import = first_losses(imported, str(tmp_path / "ft_import"))
    from_original = first_losses(trained, str(tmp_path / "ft_original"))
    assert len(from_import) == 2
    np.testing.assert_array_equal(from_import, from_original)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        export_lib.import_export(exported, imported)


def test_export_bad_input(exported, tmp_path):
    with pytest.raises(ValueError, match=r"dtype='float16' is not one of"):
        export_lib.export(exported, str(tmp_path / "x"), dtype="float16")
    with pytest.raises(ValueError, match="is an export"):
        gateloop_jax.load(exported, step=3)
    with pytest.raises(SystemExit):
        export_lib.main(["import", "--from", str(tmp_path), "--workdir", str(tmp_path / "w")])


# --- evaluate ----------------------------------------------------------------------------------------------------


def test_evaluate_split_reproduces_the_trainers_eval_metrics(trained):
    from gateloop_jax import evaluate

    logged = [m for m in read_jsonl(os.path.join(trained, "metrics.jsonl")) if "eval/loss" in m][-1]
    result = evaluate.evaluate(trained, split="validation", batch_size=4, progress=False)
    assert result["step"] == 3
    # The same windows through the same float32 model; only the batch grouping (hence summation order) differs.
    for key in ("loss", "ppl", "word_ppl", "bits_per_byte", "accuracy"):
        np.testing.assert_allclose(result[key], logged[f"eval/{key}"], rtol=1e-5, err_msg=key)


def test_evaluate_text_file_equals_the_split_and_the_oracle(trained, exported, wikitext_dir, tmp_path, capsys):  # noqa: F811
    from gateloop_jax import evaluate
    from gateloop_jax.data import tokenizer as tok_lib

    # The validation split's raw text as a file: the same tokens and windows as --split validation.
    raw = os.path.join(FIXTURE, "wiki.valid.raw")
    split = evaluate.evaluate(trained, split="validation", batch_size=4, progress=False)
    text = evaluate.evaluate(exported, text_file=raw, batch_size=3, progress=False)
    for key in ("num_tokens", "num_words", "num_bytes"):
        assert text[key] == split[key], key
    # Summation order only (batches of 3 vs 4): rtol=1e-5.
    for key in ("loss", "word_ppl", "bits_per_byte"):
        np.testing.assert_allclose(text[key], split[key], rtol=1e-5, err_msg=key)

    # A small text with non-ASCII characters against the float64 oracle (log-softmax of the model's logits).
    sample = "Caf\u00e9 au lait \u2014 the game.\n\n  A second line.\n"
    path = tmp_path / "sample.txt"
    path.write_text(sample, encoding="utf-8")
    out = tmp_path / "result.json"
    result = evaluate.main(["--workdir", trained, "--text_file", str(path), "--seq_len", "64", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == result
    model, _, tok = gateloop_jax.load(trained)
    stream = np.concatenate([[tok_lib.BOS_ID], tok_lib.encode_text(tok, sample)]).astype(np.int32)
    logits = np.asarray(model(stream[None, :-1]), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(stream) - 1), stream[1:]].sum()
    assert result["num_tokens"] == len(stream) - 1
    assert result["num_bytes"] == len(sample.encode("utf-8")) and result["num_words"] == 9
    # float32 log-softmax against float64, ~20 terms: rtol=1e-5.
    np.testing.assert_allclose(result["loss"], nll / (len(stream) - 1), rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], nll / (len(sample.encode("utf-8")) * np.log(2)), rtol=1e-5)
    np.testing.assert_allclose(result["word_ppl"], np.exp(nll / 9), rtol=1e-5)


def test_evaluate_bad_input(trained, tmp_path):
    from gateloop_jax import evaluate

    with pytest.raises(FileNotFoundError, match="text_file='nowhere.txt' does not exist"):
        evaluate.evaluate(trained, text_file="nowhere.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not valid UTF-8"):
        evaluate.evaluate(trained, text_file=str(bad), progress=False)
    with pytest.raises(ValueError, match="exactly one of text_file"):
        evaluate.evaluate(trained)
    with pytest.raises(SystemExit):
        evaluate.main(["--workdir", trained, "--text_file", "a", "--split", "validation"])
