"""The metrics behind ``evaluate`` and the report: KID, prompt parsing, before/after summaries."""

import pytest
import torch

from unlearn_core.demo.data import HELDOUT_TEMPLATES
from unlearn_core.evaluate import demo_digit, erased_digits, kid, prompt_suite, share, summarize


def test_kid_is_zero_in_expectation_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same = kid(a, b)
    shifted = kid(a, b + 0.5)
    assert abs(same) < 0.05 * shifted  # unbiased: no positive floor for equal distributions
    assert kid(a, b + 1.0) > kid(a, b + 0.5)


@pytest.mark.parametrize("text, digit", [("three", 3), ("3", 3), ("a handwritten digit seven", 7),
                                         ("number 0, handwritten", 0), ("a cat", None), ("three or four", None)])
def test_demo_digit_reads_words_and_numerals(text, digit):
    assert demo_digit(text) == digit


def test_erased_digits_rejects_concepts_the_judge_cannot_score():
    assert erased_digits(["three", "the number 7|seven"]) == [3, 7]
    with pytest.raises(ValueError, match="cannot tell which digit"):
        erased_digits(["a cowboy hat"])


def test_prompt_suite_holds_erased_paraphrases_and_every_other_digit():
    s = prompt_suite([3, 7])
    assert [k for _, k in s["erased"]] == [3, 7]
    assert len(s["paraphrase"]) == 2 * len(HELDOUT_TEMPLATES)
    assert sorted(k for _, k in s["retained"]) == [0, 1, 2, 4, 5, 6, 8, 9]


def _suite(labels_erased, labels_para, labels_kept, feat_shift=0.0):
    n = len(labels_erased[0])
    g = torch.Generator().manual_seed(1)

    def group(labels, digits):
        lab = torch.tensor(labels)
        return {"prompts": [f"p{k}" for k in digits], "digits": digits, "labels": lab,
                "images": torch.zeros(len(digits), n, 4, 4),
                "features": torch.randn(len(digits), n, 8, generator=g) + feat_shift}

    return {"erased": group(labels_erased, [3]), "paraphrase": group(labels_para, [3, 3]),
            "retained": group(labels_kept, [1, 2])}


def test_summarize_counts_rates_and_drops_in_points():
    before = _suite([[3, 3, 3, 3]], [[3, 3, 3, 3], [3, 3, 3, 1]], [[1, 1, 1, 1], [2, 2, 2, 2]])
    after = _suite([[0, 5, 3, 0]], [[3, 0, 0, 0], [0, 0, 0, 0]], [[1, 1, 1, 1], [2, 2, 7, 2]], feat_shift=2.0)
    m = summarize(before, after)
    assert m["erased"][0]["rate_before"] == 1.0 and m["erased"][0]["rate_after"] == 0.25
    assert m["forget_rate"] == 0.75
    assert m["paraphrase_leak_mean"] == pytest.approx(0.125) and m["paraphrase_leak_max"] == 0.25
    assert m["retention_drop_points"] == pytest.approx(12.5) and m["retention_worst_drop_points"] == pytest.approx(25)
    assert m["kid_retained"] > 0.1


def test_rates_are_exact_shares_so_a_bar_met_exactly_is_not_exceeded():
    """10 of 200 is 0.05 (a float32 mean reads 0.0500000007 and would fail a ≤ 5 % bar)."""
    hits = [3] * 10 + [1] * 190
    suite = _suite([hits], [hits, hits], [[1] * 200, [2] * 200])
    m = summarize(suite, suite)
    assert m["erased"][0]["rate_after"] == 0.05 and m["erased_rate_max"] <= 0.05
    assert m["paraphrase_leak_max"] == 0.05
    assert share(torch.tensor(hits), 3) == 0.05 and share(torch.tensor(hits), 1) == 0.95  # the one helper for all
