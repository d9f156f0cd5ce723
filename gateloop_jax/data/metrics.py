"""Language-model metrics that stay comparable across tokenizers.

With L = total negative log-likelihood in nats summed over every scored token of a split (mask 1):

    loss           = L / num_tokens                  nats per token
    ppl            = exp(L / num_tokens)             token-level perplexity (depends on the tokenizer)
    word_ppl       = exp(L / num_words)              word-level perplexity: the same total NLL spread over the
                                                     split's WikiText words (whitespace-separated tokens of the
                                                     raw text), so it compares across tokenizers
    bits_per_byte  = L / (num_bytes * ln 2)          bits per UTF-8 byte of the raw split text

word_ppl and bits_per_byte are only meaningful when L covers every token of the split exactly once (what
`data.eval_batches` guarantees); their denominators come from `data.split_statistics`.
"""

from __future__ import annotations

import math

# exp overflows a float64 just above 709.78; report inf rather than raise for a diverged model.
_MAX_EXP = 709.0


def _exp(x: float) -> float:
    return math.exp(x) if x <= _MAX_EXP else math.inf


def lm_metrics(
    total_nll: float,
    num_tokens: int,
    num_words: int | None = None,
    num_bytes: int | None = None,
) -> dict[str, float]:
    """Token loss/perplexity, word-level perplexity and bits per byte from a summed NLL (formulas above).

    Args:
      total_nll: sum of -log p(target) in nats over all scored tokens.
      num_tokens: number of scored tokens (sum of the mask).
      num_words: words of the evaluated text; word_ppl is omitted when None.
      num_bytes: UTF-8 bytes of the evaluated text; bits_per_byte is omitted when None.

    Returns: {"loss", "ppl"} plus "word_ppl" and "bits_per_byte" when their counts are given.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    total_nll = float(total_nll)
    out = {"loss": total_nll / num_tokens, "ppl": _exp(total_nll / num_tokens)}
    if num_words is not None:
        out["word_ppl"] = _exp(total_nll / num_words)
    if num_bytes is not None:
        out["bits_per_byte"] = total_nll / (num_bytes * math.log(2))
    return out
