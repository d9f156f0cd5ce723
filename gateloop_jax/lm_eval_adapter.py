"""EleutherAI lm-evaluation-harness adapter: GateLoopLM, an `lm_eval.api.model.LM` for any trained workdir or export.

    pip install -e ".[eval]"
    python -m gateloop_jax.lm_eval_adapter --path W_or_DIR --tasks lambada_openai,hellaswag [--num_fewshot 0]
        [--batch_size 16] [--limit 100] [--out results.json] [--include_path MY_TASKS_DIR]

    lm = GateLoopLM(path="workdirs/wikitext103")                  # or GateLoopLM(model=..., tokenizer=..., config=...)
    lm_eval.simple_evaluate(model=lm, tasks=["wikitext"])
    # or, once this module is imported: simple_evaluate(model="gateloop", model_args="path=W,batch_size=16", ...)

Text <-> tokens follows the training data's rule (gateloop_jax/data/tokenizer.py): each non-blank line is stripped
and encoded, EOS stands for the newline, blank lines carry no token, and every sequence starts with BOS (the token
the training stream starts with). A (context, continuation) pair is split the harness's way: trailing spaces of the
context move to the continuation, the continuation's tokens are those of encode(context + continuation) after
encode(context).

Scoring: requests are sorted by length and batched (rows padded on the right to a multiple of 32 positions and
batches to batch_size, so few shapes compile); one parallel forward gives every position's log-softmax. Sequences
longer than max_length keep their last max_length tokens; loglikelihood_rolling cuts long texts into the harness's
disjoint rolling windows. generate_until runs the model's prefill and then its O(1) recurrent decode step
(gateloop_jax.generate), greedily unless the task asks for sampling, and cuts the text at the first stop string.
Only models trained on text (WikiText: a SentencePiece tokenizer) can be evaluated.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional "eval" extra
    raise ImportError("gateloop_jax.lm_eval_adapter needs lm-evaluation-harness: pip install -e '.[eval]' "
                      "(or pip install lm-eval).") from e

from gateloop_jax.data import tokenizer as tok_lib

_ALIGN = 32  # padded lengths are multiples of this: one compiled program per 32-token bucket


def _round_up(n: int, multiple: int = _ALIGN) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def _target_logprobs(graphdef, state, inputs, targets, *, mode):
    """log p(targets[i] | inputs[:i+1]) and whether targets[i] is the argmax, both (b, t)."""
    logits = nnx.merge(graphdef, state)(inputs, mode=mode)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@register_model("gateloop")
class GateLoopLM(LM):
    """A gateloop_jax CausalLM for lm-eval: loglikelihood, loglikelihood_rolling, generate_until (batched)."""

    def __init__(self, path: str | None = None, *, model=None, tokenizer=None, config=None, step: int | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 mode: str | None = None, progress: bool = True, **unused):
        """Either `path` (a workdir, checkpoints directory or export; loaded with gateloop_jax.load) or `model` +
        `tokenizer` (+ `config`, whose data.seq_len is the default max_length).

        batch_size: sequences per forward ("auto" = 8; the harness's max_batch_size/device arguments are ignored).
        max_length: the longest token sequence scored at once (default: the training context data.seq_len).
        max_gen_toks: tokens generated when a task does not say.
        mode: GateLoop computation mode of the parallel forward (None = the model's).
        """
        super().__init__()
        if path is not None:
            from gateloop_jax.checkpoint_io import load

            model, config, tokenizer = load(path, None if step is None else int(step))
        if model is None or tokenizer is None:
            raise ValueError("GateLoopLM: give path= (a workdir or export of a model trained on text) or both "
                             "model= and tokenizer=; a model without a tokenizer (synthetic task) cannot read text.")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = 8 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        if max_length is None:
            max_length = config.data.seq_len if config is not None else 1024
        self.max_length, self.max_gen_toks = int(max_length), int(max_gen_toks)
        if self.batch_size < 1 or self.max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"GateLoopLM: batch_size={self.batch_size} (>= 1), max_length={self.max_length} (>= 2) "
                             f"and max_gen_toks={self.max_gen_toks} (>= 1) are out of range.")
        self.mode, self.progress = mode, progress
        self._graphdef, self._state = nnx.split(model)

    # --- text <-> tokens -------------------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        return tok_lib.BOS_ID

    @property
    def eot_token_id(self) -> int:
        return tok_lib.EOS_ID

    @property
    def tokenizer_name(self) -> str:
        return f"sentencepiece_{self.tokenizer.get_piece_size()}"

    def tok_encode(self, text: str) -> list[int]:
        """Each non-blank line's pieces; EOS after every line that a newline ends (blank lines: nothing)."""
        lines = text.split("\n")
        ids: list[int] = []
        for i, line in enumerate(lines):
            if line.strip():
                ids += self.tokenizer.encode(line.strip())
                if i < len(lines) - 1:
                    ids.append(tok_lib.EOS_ID)
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Pieces back to text, EOS as a newline."""
        segments, current = [], []
        for i in ids:
            if int(i) == tok_lib.EOS_ID:
                segments.append(current)
                current = []
            else:
                current.append(int(i))
        segments.append(current)
        return "\n".join(self.tokenizer.decode(s) for s in segments)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_ids = self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    # --- scoring ---------------------------------------------------------------------------------------------------
    def _score(self, sequences: list[list[int]], scored: list[int], desc: str) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of the last scored[i] tokens of each sequences[i] (which starts with BOS)."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[tuple[float, bool] | None] = [None] * len(sequences)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not self.progress):
            rows = [sequences[i][-(self.max_length + 1):] for i in batch]
            t = _round_up(max(len(r) for r in rows) - 1)
            inputs = np.zeros((self.batch_size, t), np.int32)
            targets = np.zeros((self.batch_size, t), np.int32)
            for r, row in enumerate(rows):
                inputs[r, :len(row) - 1], targets[r, :len(row) - 1] = row[:-1], row[1:]
            logp, greedy = jax.device_get(_target_logprobs(self._graphdef, self._state, inputs, targets,
                                                           mode=self.mode))
            for r, (i, row) in enumerate(zip(batch, rows)):
                n = min(scored[i], len(row) - 1)
                span = slice(len(row) - 1 - n, len(row) - 1)
                out[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        sequences, scored = [], []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            sequences.append([self.prefix_token_id] + context_ids + continuation_ids)
            scored.append(len(continuation_ids))
        results = self._score(sequences, scored, "loglikelihood")
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval import utils

        sequences, scored, owner = [], [], []
        for k, request in enumerate(requests):
            windows = utils.get_rolling_token_windows(self.tok_encode(request.args[0]), self.prefix_token_id,
                                                      self.max_length, 1)
            for context, prediction in map(utils.make_disjoint_window, windows):
                # _score drops the first token of a sequence (nothing predicts it): the window's context starts it.
                sequences.append(context + prediction)
                scored.append(len(prediction))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owner, self._score(sequences, scored, "loglikelihood_rolling")):
            totals[k] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        from gateloop_jax.decode import generate

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            sampling = dict(top_k=kwargs.pop("top_k", None), top_p=kwargs.pop("top_p", None))
            keep = max(self.max_length - max_new, 1)
            prompts = {i: ([self.prefix_token_id] + self.tok_encode(requests[i].args[0]))[-keep:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            batches = [order[j:j + self.batch_size] for j in range(0, len(order), self.batch_size)]
            for batch in tqdm(batches, desc="generate_until", unit="batch", disable=not self.progress):
                t = _round_up(max(len(prompts[i]) for i in batch))
                tokens = np.zeros((self.batch_size, t), np.int32)
                mask = np.zeros((self.batch_size, t), bool)
                mask[:, 0] = True  # padding rows: a one-token prompt, generated and dropped
                for r, i in enumerate(batch):
                    tokens[r, :len(prompts[i])], mask[r, :len(prompts[i])] = prompts[i], True
                generated = np.asarray(generate(self.model, tokens, max_new, prompt_mask=mask,
                                                temperature=temperature, **sampling))
                for r, i in enumerate(batch):
                    text = self.tok_decode(generated[r].tolist())
                    cut = min([text.find(s) for s in until if s and s in text], default=len(text))
                    out[i] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    p = argparse.ArgumentParser(prog="python -m gateloop_jax.lm_eval_adapter",
                                description="Run lm-evaluation-harness tasks on a gateloop_jax model.")
    p.add_argument("--path", required=True, help="training workdir, checkpoints directory or export directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=None, help="default: the training context")
    p.add_argument("--limit", type=float, default=None, help="documents per task (or a fraction if < 1)")
    p.add_argument("--include_path", default=None, help="a directory of extra task YAML files")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        lm = GateLoopLM(args.path, step=args.step, batch_size=args.batch_size, max_length=args.max_length)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    results = lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks.split(","), num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=TaskManager(include_path=args.include_path), random_seed=args.seed, numpy_random_seed=args.seed,
        log_samples=False)
    from lm_eval.utils import make_table

    print(make_table(results))
    summary = {"path": os.path.abspath(args.path), "tasks": args.tasks.split(","), "results": results["results"],
               "config": {k: v for k, v in results.get("config", {}).items() if k != "model"}}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


if __name__ == "__main__":
    main()
