r"""How far the phased channels of a trained MQAR GateLoop turn a key before its query.

Recall through a channel works when the state has not turned between a key and its query: the readout of key j at
query n is scaled by cos(sum of arg a_m over j < m <= n). For each checkpoint this reports, per layer and over the
phased channels only, the mean |arg a| on filler, key and value tokens, and over every (key, query) pair of a batch
the mean |cos| of the accumulated rotation and the share of pairs whose rotation stays under 0.5 rad. Real channels
score cos = 1 by construction; they are left out.

    python experiments/mqar_rotation.py --workdir W [--steps 500,1000] [--out results/mqar_probes/rotation.json]
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gateloop_jax  # noqa: E402
from gateloop_jax import inspection  # noqa: E402
from gateloop_jax.data import synthetic  # noqa: E402


def turn_statistics(tokens: np.ndarray, mask: np.ndarray, phase: np.ndarray, *, num_kv_pairs: int,
                    vocab_size: int) -> dict:
    """Mean |arg a| per token kind and the turn of each key by its query, for MQAR rows (synthetic.mqar's format).

    tokens, mask: (b, t); phase: (b, t, c) arg a of the channels to score. The turn of the pair bound at position p
    (the key) and queried at n is sum of arg a_m over p < m <= n."""
    half = vocab_size // 2
    kinds = {"filler": tokens == 0, "key": (tokens > 0) & (tokens < half) & ~mask, "value": tokens >= half,
             "query": mask}
    summary = {f"mean_abs_phase_{name}": float(np.abs(phase[sel]).mean()) for name, sel in kinds.items()}
    cumulative = np.cumsum(phase, axis=1)
    turns = []
    for row in range(tokens.shape[0]):
        for query in np.flatnonzero(mask[row]):
            binding = 2 * int(np.flatnonzero(tokens[row, :2 * num_kv_pairs:2] == tokens[row, query])[0])
            turns.append(cumulative[row, query] - cumulative[row, binding])
    cosines = np.cos(np.stack(turns))
    summary.update(mean_abs_cos_key_to_query=float(np.abs(cosines).mean()),
                   share_within_half_radian=float((cosines > np.cos(0.5)).mean()),
                   phased_channels=int(phase.shape[-1]))
    return summary


def rotation_summary(model, config, *, batch_size: int = 32, seed: int = 1234) -> list[dict]:
    """turn_statistics of every GateLoop layer's phased channels on an evaluation-like MQAR batch."""
    data = config.data
    batch = synthetic.mqar(np.random.default_rng(seed), batch_size, seq_len=data.seq_len,
                           num_kv_pairs=data.num_kv_pairs, vocab_size=data.vocab_size)
    tokens, mask = np.asarray(batch["inputs"]), np.asarray(batch["mask"], bool)
    d_qk, phased = model.config.head_dims[0], model.config.phased_channels
    out = []
    for layer in inspection.transitions(model, tokens):
        phase = layer["phase"][..., np.arange(layer["phase"].shape[-1]) % d_qk < phased]  # (b, t, h * phased)
        out.append(turn_statistics(tokens, mask, phase, num_kv_pairs=data.num_kv_pairs, vocab_size=data.vocab_size))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", default="", help="comma list of checkpoint steps; empty = the latest")
    ap.add_argument("--out", default="", help="append the result to this JSON file (keyed by workdir)")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",") if s] or [None]
    result = {}
    for step in steps:
        model, config, _ = gateloop_jax.load(args.workdir, step=step, tokenizer=False)
        result[str(step or "latest")] = rotation_summary(model, config)
        print(step, json.dumps(result[str(step or "latest")], indent=1))
    if args.out:
        existing = json.load(open(args.out)) if os.path.exists(args.out) else {}
        existing[args.workdir] = result
        with open(args.out, "w") as f:
            json.dump(existing, f, indent=1)


if __name__ == "__main__":
    main()
