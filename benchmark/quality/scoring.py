"""Scoring model outputs as RULER does.

* ``recall``: the fraction of reference answers that occur in the output (RULER's string_match_all), after
  cutting the output at its first newline; for a single-answer task this is containment of the answer.
* ``exact``: 1 when every answer is recalled (the sample is fully right), else 0.

Comparisons are case-insensitive and ignore surrounding whitespace, as RULER's are.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def _clean(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip().lower()


def recall(output: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` found in ``output`` (first line); 0.0 for an empty answer list is an error."""
    if not answers:
        raise ValueError("answers: need at least one reference answer")
    out = _clean(output)
    return sum(a.strip().lower() in out for a in answers) / len(answers)


def exact(output: str, answers: Sequence[str]) -> float:
    return 1.0 if recall(output, answers) == 1.0 else 0.0


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
