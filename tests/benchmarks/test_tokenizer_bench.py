"""``prepare``'s question tokenizer (harness/data/prepare/text.py) on long hostile questions: a period
followed by a long run of spaces, quotes or brackets is where a backtracking final-period rule goes
quadratic (60 KB of ``a.`` + spaces took over a minute). Each case is 60 KB; when benchmarking,
its median must stay within :data:`BUDGET_S` (a linear tokenizer takes a few tens of ms here).

    python -m pytest tests/benchmarks/test_tokenizer_bench.py --benchmark-enable

With the project's default ``--benchmark-disable`` each case runs once and only its tokens are
checked."""
from __future__ import annotations

import pytest

from harness.data import prepare as P

SIZE = 60_000
BUDGET_S = 1.0  # per 60 KB question; the quadratic rule took ~78 s

CASES = {
    # text, its first tokens, its number of tokens
    "period then spaces then text": ("a." + " " * SIZE + "x?", ["a.", "x"], 2),
    "period then spaces": ("a." + " " * SIZE + "?", ["a", "."], 2),
    "period then quotes then text": ("a." + "'" * SIZE + "x?", ["a.", "''"], SIZE // 2 + 2),
    "period then brackets then text": ("a." + ")" * SIZE + "x?", ["a.", ")"], SIZE + 2),
    "many periods and spaces": (("a." + " " * 200) * (SIZE // 202) + "x?", ["a.", "a."], SIZE // 202 + 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_long_hostile_question_tokenizes_in_linear_time(benchmark, case):
    text, first, count = CASES[case]
    tokens = benchmark.pedantic(P.question_tokens, args=(text,), rounds=1 if benchmark.disabled else 5,
                                iterations=1)
    assert tokens[:2] == first and len(tokens) == count
    if not benchmark.disabled:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update({"chars": len(text), "tokens": len(tokens), "median_s": median})
        assert median <= BUDGET_S, f"{case}: {median:.2f} s for {len(text):,} characters (budget {BUDGET_S} s)"
