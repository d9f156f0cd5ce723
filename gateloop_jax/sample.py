"""Sample from a trained checkpoint on the command line.

    python -m gateloop_jax.sample --workdir workdirs/wikitext103 --prompt "The history of" --max_new_tokens 40
    python -m gateloop_jax.sample --workdir workdirs/memory_horizon --prompt "3 4 11" --prompt "1 10 2 5 11" \
        --max_new_tokens 1 --temperature 0

Text prompts go through the checkpoint's tokenizer (WikiText). Synthetic tasks have no tokenizer: a prompt is
space-separated token ids (memory_horizon: digits 0-9, RESET 10, QUERY 11; the token generated after a QUERY is the
model's answer, the running digit sum mod 10 since the last RESET). Several --prompt flags decode as one batch of
prompts of different lengths. Tokens stream to stdout as they are generated when there is one prompt.
A mistake in the flags is answered in one line (exit status 2) before the checkpoint loads; --debug shows its
traceback (gateloop_jax/cli.py).
"""

from __future__ import annotations

import sys

from absl import flags, logging

from gateloop_jax import cli
from gateloop_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (or its checkpoints directory).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (token ids for synthetic tasks); repeatable.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling: keep the most likely tokens of total probability p.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_MODE = flags.DEFINE_string("mode", None, "GateLoop mode of the prompt's prefill; default the trained config's.")
flags.mark_flags_as_required(["workdir", "prompt"])


def parse_ids(prompt: str, vocab_size: int) -> list[int]:
    """'3 4 11' -> [3, 4, 11], checked against the vocabulary."""
    try:
        ids = [int(word) for word in prompt.split()]
    except ValueError:
        raise ConfigError(f"this checkpoint has no tokenizer (a synthetic task): --prompt must be space-separated "
                             f"token ids, got {prompt!r}.") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad or not ids:
        raise ConfigError(f"--prompt {prompt!r}: token ids must be in [0, {vocab_size}) and at least one is needed.")
    return ids


def check_flags() -> None:
    """The sampling flags' ranges, before the checkpoint loads (ConfigError naming the flag)."""
    from gateloop_jax.decode import Sampler
    from gateloop_jax.ops.common import KERNEL_MODES, MODES

    if _MAX_NEW_TOKENS.value < 1:
        raise ConfigError(f"--max_new_tokens={_MAX_NEW_TOKENS.value}: must be >= 1.")
    try:  # generate's own checks of temperature, top_k, top_p, answered as the flags they came from
        Sampler(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    except ValueError as e:
        raise ConfigError(str(e).replace("generate: ", "--")) from None
    if _STEP.value is not None and _STEP.value < 0:
        raise ConfigError(f"--step={_STEP.value}: must be a checkpoint step >= 0, or left out for the latest.")
    modes = ("auto",) + MODES + KERNEL_MODES
    if _MODE.value is not None and _MODE.value not in modes:
        raise ConfigError(f"--mode={_MODE.value!r} is not one of {modes}.")


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}: quote a prompt with spaces, --prompt \"3 4 11\".")
    check_flags()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it reads at INFO.
    import numpy as np

    import gateloop_jax
    from gateloop_jax import inspection

    model, config, tokenizer = gateloop_jax.load(_WORKDIR.value, step=_STEP.value)
    if tokenizer is not None:
        ids = [tokenizer.encode(p) for p in _PROMPT.value]
        render = lambda row: tokenizer.decode([int(i) for i in row])  # noqa: E731
    else:
        ids = [parse_ids(p, config.model.vocab_size) for p in _PROMPT.value]
        render = lambda row: " ".join(str(int(i)) for i in row)  # noqa: E731

    callback = None
    if len(ids) == 1:
        print(f"{_PROMPT.value[0]} ->", end="", flush=True)

        def callback(step, tokens):
            print(" " + (tokenizer.id_to_piece(int(tokens[0])) if tokenizer is not None else str(int(tokens[0]))),
                  end="", flush=True)

    out = np.asarray(gateloop_jax.generate(
        model, ids, _MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        seed=_SEED.value, callback=callback, mode=_MODE.value))
    if callback is not None:
        print()
    for prompt, prompt_ids, row in zip(_PROMPT.value, ids, out):
        labels = "" if tokenizer is not None else f"   [{' '.join(inspection.token_labels(config, prompt_ids))}]"
        print(f"prompt: {prompt!r}{labels}\n  generated: {render(row)}")
    sys.stdout.flush()


if __name__ == "__main__":
    cli.run_absl(main, prog="gateloop_jax.sample")
