"""Export a checkpoint as safetensors + config.json (+ tokenizer, model card), and import such an export back.

    python -m gateloop_jax.export --workdir W [--step N] --out DIR [--dtype float32|bfloat16]
    python -m gateloop_jax.export import --from DIR --workdir W2        # then fine-tune with --config.init_from=W2

An export directory holds:

    model.safetensors   the parameters, one tensor per name; names are the module tree joined by dots,
                        e.g. "embed.embedding", "blocks.0.mixer.q_proj.kernel", "final_norm.scale"
                        (nnx Linear kernels are (in, out), unlike PyTorch's (out, in))
    config.json         {"format": "gateloop_jax", "model": ModelConfig fields, "dtype", "step", "num_params",
                        "tokenizer": {...} or null, "data": the data config, "train_config": the training config}
    tokenizer.model     the SentencePiece model (WikiText runs; synthetic tasks have no tokenizer)
    README.md           a model card: architecture, parameter count, training steps, evaluation metrics

`gateloop_jax.load(DIR)` reads it without Orbax. Importing writes a parameters-only Orbax checkpoint
W2/checkpoints/<step>/ (params + meta): `gateloop_jax.load(W2)` reads it and the trainer starts from it with
`--config.init_from=W2` (fresh optimizer state and data order, as init_from always does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

FORMAT = "gateloop_jax"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
CARD = "README.md"
DTYPES = ("float32", "bfloat16")


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def flatten_params(params) -> dict[str, Any]:
    """Nested parameter dict -> {"blocks.0.mixer.q_proj.kernel": array, ...}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat[".".join(_key(k) for k in path)] = leaf
    return flat


def unflatten_params(flat: dict[str, Any], like, *, source: str = "the export"):
    """{name: array} -> a tree shaped like `like` (the model's parameter dict); names and shapes must match exactly."""
    names = flatten_params(like)
    missing, unexpected = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model its config.json builds: missing tensors {missing[:8]}, "
                         f"unexpected tensors {unexpected[:8]}.")
    for name, ref in names.items():
        if tuple(flat[name].shape) != tuple(ref.shape):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(flat[name].shape)}, the model needs "
                             f"{tuple(ref.shape)}.")
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[".".join(_key(k) for k in p)] for p, _ in paths])


def is_export(path: str) -> bool:
    return os.path.isfile(os.path.join(path, WEIGHTS)) and os.path.isfile(os.path.join(path, CONFIG))


# --- export ----------------------------------------------------------------------------------------------------


def _latest_eval(workdir: str, step: int) -> dict[str, float]:
    """The last evaluation metrics logged at or before `step` in workdir/metrics.jsonl ({} if none)."""
    from gateloop_jax.train.metrics import read_jsonl

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    evals = [m for m in read_jsonl(path) if m.get("step", math.inf) <= step and any(k.startswith("eval/") for k in m)]
    if not evals:
        return {}
    last = evals[-1]
    return {"step": last["step"], **{k: v for k, v in last.items() if k.startswith("eval/")}}


def _model_card(info: dict[str, Any], metrics: dict[str, float]) -> str:
    m = info["model"]
    d_qk, d_v = (m["d_qk"] or m["d_model"] // m["num_heads"]), (m["d_v"] or m["d_model"] // m["num_heads"])
    tok = info["tokenizer"]
    lines = [
        f"# {m['name']} language model (gateloop_jax)",
        "",
        "GateLoop: a linear recurrence with data-controlled complex state transitions (Katsch 2023), trained and "
        "exported with gateloop_jax.",
        "",
        "## Architecture",
        "",
        f"- model `{m['name']}` (transition `{m['transition']}`), num_layers {m['num_layers']}, "
        f"d_model {m['d_model']}, {m['num_heads']} heads of d_qk {d_qk} / d_v {d_v}, "
        f"FFN `{m['ffn']}` {m['mlp_dim'] or 4 * m['d_model']}, {m['norm_position']}-norm, "
        f"tied embeddings: {m['tie_embeddings']}",
        f"- vocabulary {m['vocab_size']}"
        + (f" (SentencePiece `{TOKENIZER}`)" if tok else " (no tokenizer: token ids)"),
        f"- parameters: {info['num_params']:,} (stored as {info['dtype']})",
        f"- training: {info['step']:,} optimizer steps on `{info['data']['name']}`, context {info['data']['seq_len']}",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        lines += [f"Logged by the trainer at step {metrics['step']} (`{info['eval_split']}` split):", "",
                  "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items() if k != "step"]
    else:
        lines += ["No evaluation metrics were found in the workdir's metrics.jsonl."]
    lines += [
        "",
        "## Use",
        "",
        "```",
        "import gateloop_jax",
        "model, config, tokenizer = gateloop_jax.load('THIS_DIRECTORY')",
        "logits = model(tokens)   # (batch, length) int32 -> (batch, length, vocab) float32",
        "```",
        "",
        "Files: `model.safetensors` (parameters named by the module tree), `config.json` (model and data config).",
        "",
    ]
    return "\n".join(lines)


def export(path: str, out: str, *, step: int | None = None, dtype: str = "float32") -> str:
    """Writes the export of checkpoint `step` (None = latest) of workdir `path` into `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ValueError(f"export: dtype={dtype!r} is not one of {DTYPES}.")
    from flax import nnx
    from safetensors.numpy import save_file

    from gateloop_jax.checkpoint_io import latest_step, load
    from gateloop_jax.models import param_count

    path = os.path.abspath(os.path.expanduser(path))
    if is_export(path):
        raise ValueError(f"export: {path} is already an export; copy it, or export a training workdir.")
    step = latest_step(path) if step is None else step
    model, config, tokenizer = load(path, step)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    np_dtype = np.float32 if dtype == "float32" else jax.numpy.bfloat16
    tensors = {k: np.ascontiguousarray(np.asarray(v).astype(np_dtype)) for k, v in flatten_params(params).items()}

    out = os.path.abspath(os.path.expanduser(out))
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, WEIGHTS), metadata={"format": FORMAT, "step": str(step)})
    tok_info = None
    if tokenizer is not None:
        from gateloop_jax.data import text_prep
        from gateloop_jax.data import tokenizer as tok_lib

        name = tok_lib.tokenizer_name(vocab_size=config.data.vocab_size, model_type=config.data.model_type,
                                      byte_fallback=config.data.byte_fallback)
        source = text_prep.tokenizer_path(config.data.data_dir, config.data.name, name)
        shutil.copyfile(source, os.path.join(out, TOKENIZER))
        tok_info = {"file": TOKENIZER, "type": "sentencepiece", "vocab_size": int(tokenizer.get_piece_size()),
                    "unk_id": tok_lib.UNK_ID, "bos_id": tok_lib.BOS_ID, "eos_id": tok_lib.EOS_ID,
                    "eod_id": tok_lib.EOD_ID,
                    "encoding": "each non-blank line of text stripped and encoded, followed by EOS (EOS stands for "
                                "the newline); a token stream starts with BOS"}
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config), "dtype": dtype, "step": int(step),
        "num_params": int(param_count(model)), "tokenizer": tok_info,
        "data": config.data.to_dict(), "eval_split": config.get("eval_split"), "train_config": config.to_dict(),
    }
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(info, f, indent=2, default=str)
    workdir = os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path
    with open(os.path.join(out, CARD), "w") as f:
        f.write(_model_card(info, _latest_eval(workdir, step)))
    return out


# --- load and import ---------------------------------------------------------------------------------------------


def read_config(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, CONFIG)) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(f"{directory}/{CONFIG} is not a gateloop_jax export (format={info.get('format')!r}).")
    return info


def load_export(directory: str, *, tokenizer: bool = True):
    """(model, config, tokenizer or None) of an export directory; what gateloop_jax.load does for one."""
    from flax import nnx
    from safetensors.numpy import load_file

    from gateloop_jax.models import build_model
    from gateloop_jax.models.config import ModelConfig

    directory = os.path.abspath(os.path.expanduser(directory))
    info = read_config(directory)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        model = build_model(ModelConfig.from_mapping(info["model"]), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    like = nnx.to_pure_dict(state)
    flat = load_file(os.path.join(directory, WEIGHTS))
    params = unflatten_params(flat, like, source=os.path.join(directory, WEIGHTS))
    # Stored bfloat16 tensors come back in the model's parameter dtype (float32 unless configured otherwise).
    params = jax.tree.map(lambda v, ref: jax.device_put(np.asarray(v).astype(ref.dtype), cpu), params, like)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    config = ml_collections.ConfigDict(info["train_config"])
    tok = None
    if tokenizer and info.get("tokenizer"):
        from gateloop_jax.data import tokenizer as tok_lib

        tok = tok_lib.load(os.path.join(directory, info["tokenizer"]["file"]))
    return model, config, tok


def import_export(directory: str, workdir: str) -> str:
    """Writes the parameters of export `directory` as a parameters-only checkpoint W/checkpoints/<step>/ (params and
    meta) plus W/config.json; returns its checkpoints directory. Train from it with --config.init_from=W."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from gateloop_jax.train import checkpoint as ckpt_lib

    model, config, _ = load_export(directory, tokenizer=False)
    step = int(read_config(os.path.abspath(os.path.expanduser(directory)))["step"])
    workdir = os.path.abspath(os.path.expanduser(workdir))
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"import: {ckpt_dir} already holds checkpoints; import into a new --workdir.")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(ckpt_dir, options=options, item_names=ckpt_lib.ITEMS) as manager:
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            meta=ocp.args.JsonSave({"step": step, "config": json.loads(config.to_json_best_effort())})))
        manager.wait_until_finished()
    return ckpt_dir


# --- command line ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:
        p = argparse.ArgumentParser(prog="python -m gateloop_jax.export import",
                                    description="An export directory -> a workdir to fine-tune from (init_from).")
        p.add_argument("--from", dest="source", required=True, help="export directory (model.safetensors + config)")
        p.add_argument("--workdir", required=True, help="new directory for the parameters-only checkpoint")
        args = p.parse_args(argv[1:])
        if not is_export(args.source):
            p.error(f"--from {args.source}: no {WEIGHTS} and {CONFIG} there (make one with "
                    "python -m gateloop_jax.export --workdir W --out DIR).")
        try:
            ckpt_dir = import_export(args.source, args.workdir)
        except (ValueError, FileExistsError) as e:
            p.error(str(e))
        print(f"wrote {ckpt_dir}\nfine-tune with: python -m gateloop_jax.main --config CONFIG --workdir NEW_WORKDIR "
              f"--config.init_from={os.path.abspath(args.workdir)}")
        return
    p = argparse.ArgumentParser(prog="python -m gateloop_jax.export",
                                description="A training checkpoint -> safetensors, config.json, tokenizer, model card.")
    p.add_argument("--workdir", required=True, help="training workdir (or its checkpoints directory)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the stored tensors")
    args = p.parse_args(argv)
    try:
        out = export(args.workdir, args.out, step=args.step, dtype=args.dtype)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    main()
