"""What counts as a model's answer: the part an answer regex captures, normalised for comparison.

Evaluation's exact match (evaluate/metrics.py) and GRPO's rewards (prefer/rewards.py) both compare answers this
way, so a reward and `tunesmith eval` agree on what is right.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation at the edges and articles, collapse whitespace
    (the SQuAD-style normalisation of Rajpurkar et al., 2016, minus removal of inner punctuation,
    which would make '2021-03-04' equal '20210304')."""
    text = text.strip().lower()
    text = _ARTICLES.sub(" ", text)
    text = " ".join(text.split())
    return text.strip(string.punctuation + " ")


def extract_answer(text: str, answer_regex: str | None) -> str:
    """What `answer_regex` captures in `text` (its first group, else the whole match); '' when it does
    not match; the whole text when there is no regex."""
    if not answer_regex:
        return text
    found = re.search(answer_regex, text)
    if not found:
        return ""
    return (found.group(1) or "") if found.groups() else found.group(0)  # an optional group may match nothing
