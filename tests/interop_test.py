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
    # evaluate --text_file reads a file as one stream, so the split it is compared with is packed as one stream too.
    c.data.packing = "stream"
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


# --- lm-evaluation-harness adapter -----------------------------------------------------------------------------------


def _logits(model, tokens, pad_to=64):
    """The model's float32 logits (t, V) of one row, computed padded on the right to pad_to positions (causal: the
    padding does not change them) so that every call reuses one compiled program."""
    from flax import nnx

    if not hasattr(model, "_test_forward"):
        graphdef, state = nnx.split(model)
        model._test_forward = jax.jit(lambda x: nnx.merge(graphdef, state)(x))
    padded = np.zeros((1, pad_to), np.int32)
    padded[0, :len(tokens)] = tokens
    return np.asarray(model._test_forward(padded))[0, :len(tokens)]


def _oracle_logprobs(model, sequence):
    """float64 log-softmax of the model's own logits: log p(sequence[i+1] | sequence[:i+1]) and the argmax, per i."""
    logits = _logits(model, sequence[:-1]).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    targets = np.asarray(sequence[1:])
    return logp[np.arange(len(targets)), targets], logits.argmax(-1) == targets


@pytest.fixture(scope="module")
def harness_lm(exported):
    pytest.importorskip("lm_eval")
    from gateloop_jax.lm_eval_adapter import GateLoopLM

    # batch_size 2 with 3-4 requests: a full batch and a padded one, rows of different lengths.
    return GateLoopLM(exported, batch_size=2, max_length=64, max_gen_toks=6, progress=False)


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_harness_tokenization_follows_the_training_rule(harness_lm):
    sp = harness_lm.tokenizer
    eos = harness_lm.eot_token_id
    assert harness_lm.tok_encode("The game\n\n  was good\nover") == (
        sp.encode("The game") + [eos] + sp.encode("was good") + [eos] + sp.encode("over"))
    assert harness_lm.tok_encode("line\n") == sp.encode("line") + [eos]
    assert harness_lm.tok_decode(harness_lm.tok_encode("The game\nwas good")) == "The game\nwas good"
    # Trailing context spaces move to the continuation; the continuation is what the whole adds to the context.
    context, continuation = harness_lm._encode_pair("The game ", "was good")
    assert context == sp.encode("The game") and context + continuation == harness_lm.tok_encode("The game was good")


def test_harness_loglikelihood_is_the_models_log_softmax(harness_lm):
    model = harness_lm.model
    pairs = [("The game", " was released in Japan"), ("", "Hello there"), ("First line\nSecond", " line ends\n"),
             ("A", " b")]
    results = harness_lm.loglikelihood(_instances("loglikelihood", pairs))
    assert len(results) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        context_ids, continuation_ids = harness_lm._encode_pair(context, continuation)
        assert continuation_ids, continuation
        logp, is_max = _oracle_logprobs(model, [1] + context_ids + continuation_ids)
        n = len(continuation_ids)
        # float32 log-softmax against the float64 oracle on the same logits, summed over <= 10 tokens: rtol=1e-5.
        np.testing.assert_allclose(logprob, logp[-n:].sum(), rtol=1e-5, atol=1e-5)
        assert greedy == bool(is_max[-n:].all())


def test_harness_loglikelihood_rolling_scores_every_token_once(harness_lm, exported):
    from gateloop_jax.lm_eval_adapter import GateLoopLM

    model = harness_lm.model
    texts = ["The game was released in Japan in 2011.\nIt sold well.", "Short text"]
    results = harness_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    for text, total in zip(texts, results):
        ids = harness_lm.tok_encode(text)
        assert len(ids) < harness_lm.max_length  # one window: every token given BOS and all before it
        logp, _ = _oracle_logprobs(model, [1] + ids)
        np.testing.assert_allclose(total, logp.sum(), rtol=1e-5, atol=1e-5)
    # Windows of 8 tokens: each token is scored once, with at most 7 tokens of context (lm-eval's rolling rule).
    short = GateLoopLM(model=model, tokenizer=harness_lm.tokenizer, batch_size=3, max_length=8, progress=False)
    ids = short.tok_encode(texts[0])
    assert len(ids) > 16
    # Window 0: BOS + ids[:7] predicts ids[:8]; window k predicts ids[8k:end] from the 8 tokens before `end`.
    expected = _oracle_logprobs(model, [1] + ids[:8])[0].sum()
    for start in range(8, len(ids), 8):
        end = min(start + 8, len(ids))
        expected += _oracle_logprobs(model, ids[end - 9:end])[0][-(end - start):].sum()
    [total] = short.loglikelihood_rolling(_instances("loglikelihood_rolling", [(texts[0],)]))
    np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-5)


def test_harness_generate_until_is_greedy_decoding(harness_lm):
    model = harness_lm.model
    contexts = ["The game was", "In 2011 , the", "It"]

    def greedy(context, n):  # full forward each step: no decode cache involved
        seq = [1] + harness_lm.tok_encode(context)
        for _ in range(n):
            seq.append(int(_logits(model, seq)[-1].argmax()))
        return harness_lm.tok_decode(seq[-n:])

    expected = [greedy(c, 6) for c in contexts]
    got = harness_lm.generate_until(_instances("generate_until", [(c, {"until": [], "max_gen_toks": 6})
                                                                  for c in contexts]))
    assert got == expected
    stop = expected[0][2:4]
    [cut] = harness_lm.generate_until(_instances("generate_until", [(contexts[0], {"until": [stop],
                                                                                    "max_gen_toks": 6})]))
    assert cut == expected[0][:expected[0].find(stop)]


def test_harness_needs_a_tokenizer():
    pytest.importorskip("lm_eval")
    from gateloop_jax.lm_eval_adapter import GateLoopLM

    with pytest.raises(ValueError, match="cannot read text"):
        GateLoopLM(model=object())


def test_harness_command_runs_a_local_task(harness_lm, exported, tmp_path, monkeypatch):
    """simple_evaluate end to end, offline: a two-document multiple-choice task from a local JSON file."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from gateloop_jax import lm_eval_adapter

    docs = [{"context": "The game was released in", "choices": [" Japan", " the"], "label": 0},
            {"context": "It sold", "choices": [" well", " game"], "label": 1}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tiny_choice.yaml").write_text(f"""task: gateloop_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "docs.jsonl"}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    higher_is_better: true
""")
    out = tmp_path / "results.json"
    summary = lm_eval_adapter.main(["--path", exported, "--tasks", "gateloop_tiny_choice", "--include_path",
                                    str(tmp_path), "--batch_size", "2", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps(summary["results"], default=str))
    # acc: the choice with the highest log-likelihood (the model's own log-softmax) is the label.
    correct = []
    for d in docs:
        scores = []
        for choice in d["choices"]:
            context_ids, choice_ids = harness_lm._encode_pair(d["context"], choice)
            logp, _ = _oracle_logprobs(harness_lm.model, [1] + context_ids + choice_ids)
            scores.append(logp[-len(choice_ids):].sum())
        correct.append(float(np.argmax(scores) == d["label"]))
    assert summary["results"]["gateloop_tiny_choice"]["acc,none"] == pytest.approx(np.mean(correct), abs=1e-12)


def test_export_of_a_synthetic_task_model(tmp_path):
    """No tokenizer: config.json says so, the card too, and the export loads to the same logits."""
    workdir = str(tmp_path / "mh")
    c = get_config()
    c.total_steps = c.ckpt_every_steps = 1
    c.eval_every_steps = 0
    c.mesh.update(data=1)
    train_and_evaluate(c, workdir)
    out = export_lib.export(workdir, str(tmp_path / "export"))
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    assert json.load(open(os.path.join(out, "config.json")))["tokenizer"] is None
    assert "no tokenizer" in open(os.path.join(out, "README.md")).read()
    model, _, tok = gateloop_jax.load(workdir)
    model2, _, tok2 = gateloop_jax.load(out)
    assert tok is None and tok2 is None
    tokens = TOKENS % model.config.vocab_size
    np.testing.assert_array_equal(np.asarray(model2(tokens)), np.asarray(model(tokens)))
