"""LM metrics on hand-computed numbers."""

import math

import pytest

from gateloop_jax import data


def test_hand_computed():
    # 10 tokens each with p = 1/4: total NLL = 10 ln 4.
    m = data.lm_metrics(10 * math.log(4), num_tokens=10, num_words=5, num_bytes=20)
    assert m["loss"] == pytest.approx(math.log(4), rel=1e-12)
    assert m["ppl"] == pytest.approx(4.0, rel=1e-12)
    # Same NLL over 5 words: exp(10 ln 4 / 5) = 4 ** 2.
    assert m["word_ppl"] == pytest.approx(16.0, rel=1e-12)
    # 10 tokens * 2 bits over 20 bytes.
    assert m["bits_per_byte"] == pytest.approx(1.0, rel=1e-12)


def test_optional_counts_and_overflow():
    m = data.lm_metrics(3.0, num_tokens=3)
    assert set(m) == {"loss", "ppl"} and m["ppl"] == pytest.approx(math.e, rel=1e-12)
    assert data.lm_metrics(1e6, num_tokens=10, num_words=1)["word_ppl"] == math.inf
    with pytest.raises(ValueError, match="num_tokens must be positive"):
        data.lm_metrics(1.0, num_tokens=0)
