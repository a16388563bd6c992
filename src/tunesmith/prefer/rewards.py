"""GRPO's reward functions: each scores every sampled completion with one float, and the weighted sum is its reward.

A reward function is called as fn(prompts, completions, references) with three lists of the same length (one
entry per completion; `references[i]` holds the references of completion i's prompt) and returns one float per
completion.  The built-ins, one per `objective.rewards[i].type`:

    exact_match  1 when the answer (what `answer_regex` captures) equals a reference's answer after
                 normalisation, else 0 (the same comparison as `tunesmith evaluate`'s exact match)
    number       1 when the last number in the answer is within `tolerance` of the last number in a
                 reference's answer, else 0; a number may have a sign, thousands commas and decimals
    regex        1 when `pattern` is found anywhere in the completion (re.search), else 0
    length       1 - |characters - target| / target, clipped to [0, 1]: 1 at `target`, 0 at 0 and 2x target
    python       your `function` ("module:function", importable from the working directory)

`make_rewards` checks the whole list before training starts (patterns compile, python functions import), so
a mistake stops the run with a sentence, not after the first minutes of sampling.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import re
import sys
from collections.abc import Callable

from tunesmith.config import ObjectiveConfig, RewardConfig
from tunesmith.data.answers import extract_answer, normalize_answer
from tunesmith.errors import UserError, visible

# (prompts, completions, references per completion) -> one float per completion
RewardFn = Callable[[list[str], list[str], list[list[str]]], list[float]]

# A number: an optional sign (not one joined to a word or number before it, so 2021-03-04 ends in 4, not -4),
# then digits with commas between groups of three (1,234,567) or plain digits, then an optional decimal part;
# or a bare decimal part (.5).  U+2212 is the minus sign of typeset text.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")


def _last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", "").replace("\u2212", "-"))


# --- the built-ins ------------------------------------------------------------------------------------------


def _exact_match(answer_regex: str | None) -> RewardFn:
    def exact_match(prompts: list[str], completions: list[str], references: list[list[str]]) -> list[float]:
        scores = []
        for completion, refs in zip(completions, references):
            answer = normalize_answer(extract_answer(completion, answer_regex))
            wanted = {normalize_answer(extract_answer(ref, answer_regex)) for ref in refs} - {""}  # an empty reference matches nothing
            scores.append(1.0 if answer in wanted else 0.0)
        return scores

    return exact_match


def _number(answer_regex: str | None, tolerance: float) -> RewardFn:
    def number(prompts: list[str], completions: list[str], references: list[list[str]]) -> list[float]:
        scores = []
        for completion, refs in zip(completions, references):
            got = _last_number(extract_answer(completion, answer_regex))
            wanted = [n for n in (_last_number(extract_answer(ref, answer_regex)) for ref in refs) if n is not None]
            hit = got is not None and any(abs(got - n) <= tolerance for n in wanted)
            scores.append(1.0 if hit else 0.0)
        return scores

    return number


def _regex(pattern: re.Pattern) -> RewardFn:
    def regex(prompts: list[str], completions: list[str], references: list[list[str]]) -> list[float]:
        return [1.0 if pattern.search(c) else 0.0 for c in completions]

    return regex


def _length(target: int) -> RewardFn:
    def length(prompts: list[str], completions: list[str], references: list[list[str]]) -> list[float]:
        return [min(1.0, max(0.0, 1.0 - abs(len(c) - target) / target)) for c in completions]

    return length


# --- python: the user's function ----------------------------------------------------------------------------


def _import_function(spec: str | None, key: str) -> RewardFn:
    """The function `spec` ("module:function") names, the module imported with the working directory on sys.path
    (for this import only).  Every way it can fail is a UserError naming `key`."""
    example = "e.g. `my_rewards:score` for `def score(prompts, completions, references)` in my_rewards.py"
    if not spec:
        raise UserError(f"{key}: a python reward needs a function; set it to module:function, {example} in the "
                        "working directory.")
    module_name, colon, name = spec.partition(":")
    module_name, name = module_name.strip(), name.strip()
    if not colon or not module_name or not name:
        raise UserError(f"{key}: `{visible(spec)}` is not module:function; write it as {example}.")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        raise UserError(f"{key}: `{visible(spec)}` names a file; name the module instead (a file my_rewards.py in the "
                        f"working directory is the module my_rewards), {example}.")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        importlib.invalidate_caches()  # a module written since the last import in this process is found
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, a syntax error, or anything its top-level code raised
        raise UserError(f"{key}: cannot import module `{visible(module_name)}` of `{visible(spec)}` "
                        f"({type(exc).__name__}: {visible(exc)}); put {visible(module_name)}.py in the working "
                        f"directory ({visible(cwd)}) or install it, and check that `python -c \"import "
                        f"{visible(module_name)}\"` works there.") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"{key}: module `{visible(module_name)}` has no `{visible(name)}`; check the spelling, or define "
                        f"`def {visible(name)}(prompts, completions, references)` in it.")
    if not callable(fn):
        raise UserError(f"{key}: `{visible(spec)}` is a value of type {type(fn).__name__}, not a function; name a function "
                        "(prompts, completions, references) -> one float per completion.")
    return fn


def _checked_python(fn: RewardFn, spec: str, key: str) -> RewardFn:
    """`fn`, its result checked on every call: one finite number per completion."""

    def python(prompts: list[str], completions: list[str], references: list[list[str]]) -> list[float]:
        result = fn(prompts, completions, references)
        values = result.tolist() if hasattr(result, "tolist") else result  # a numpy array or torch tensor
        wanted = f"return a list of {len(completions)} numbers, one per completion"
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or len(values) != len(completions):
            raise UserError(f"{key}: `{visible(spec)}` returned {visible(repr(result), 200)} for {len(completions)} "
                            f"completions; {wanted}.")
        bad = [v for v in values if not isinstance(v, numbers.Real) or not math.isfinite(v)]
        if bad:
            raise UserError(f"{key}: `{visible(spec)}` returned {visible(repr(bad[0]), 100)} among its values "
                            f"({visible(repr(result), 200)}); {wanted}, each finite (no NaN or infinity).")
        return [float(v) for v in values]

    return python


# --- the list ---------------------------------------------------------------------------------------------


def _compile(pattern: str, key: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # as config.py's answer_regex check
        raise UserError(f"{key}: `{visible(pattern)}` is not a regular expression ({visible(exc)}); {what}.") from None


def _reward_fn(reward: RewardConfig, key: str, answer_regex: str | None) -> tuple[str, RewardFn]:
    """(name, function) of one entry of objective.rewards."""
    if reward.type == "exact_match":
        return "exact_match", _exact_match(answer_regex)
    if reward.type == "number":
        return "number", _number(answer_regex, reward.tolerance)
    if reward.type == "regex":
        if not reward.pattern:
            raise UserError(f"{key}.pattern: a regex reward needs a pattern, the regular expression a good completion "
                            "contains (re.search), e.g. pattern: '#### \\d+'.")
        return "regex", _regex(_compile(reward.pattern, f"{key}.pattern", "fix the pattern (Python's re syntax)"))
    if reward.type == "length":
        return "length", _length(reward.target)
    if reward.type == "python":
        fn = _import_function(reward.function, f"{key}.function")
        return reward.function, _checked_python(fn, reward.function, f"{key}.function")
    raise AssertionError(f"unknown reward type {reward.type!r}")  # the config's Literal allows no other


class Rewards:
    """The rewards of `objective.rewards`, called together: (weighted sum per completion, each reward's own values
    by name).  Names are the types ("exact_match") or the python function's "module:function"; a name that
    occurs twice gets _2, _3... so every reward keeps its own column in the logs."""

    def __init__(self, names: list[str], functions: list[RewardFn], weights: list[float]):
        self.names, self.functions, self.weights = names, functions, weights

    def __call__(self, prompts: list[str], completions: list[str],
                 references: list[list[str]]) -> tuple[list[float], dict[str, list[float]]]:
        if not len(prompts) == len(completions) == len(references):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(references)} "
                             "reference lists: one of each per completion")
        by_name: dict[str, list[float]] = {}
        totals = [0.0] * len(completions)
        for name, fn, weight in zip(self.names, self.functions, self.weights):
            values = fn(prompts, completions, references)
            by_name[name] = values
            totals = [t + weight * v for t, v in zip(totals, values)]
        return totals, by_name


def make_rewards(objective: ObjectiveConfig, answer_regex: str | None) -> Rewards:
    """The rewards `objective.rewards` names, checked now: patterns compile, python functions import and are
    callable.  `answer_regex` (eval.answer_regex) picks the answer out of a completion and a reference for
    exact_match and number."""
    if answer_regex:  # checked now; the answer functions (data/answers.py) take it as text
        _compile(answer_regex, "eval.answer_regex", "fix it, or leave it out to compare whole completions")
    if not objective.rewards:
        raise UserError("objective.rewards: GRPO needs at least one reward, e.g. rewards: [exact_match].")
    kinds: list[str] = []  # each reward's name before _2, _3...
    names: list[str] = []
    functions: list[RewardFn] = []
    for i, reward in enumerate(objective.rewards):
        kind, fn = _reward_fn(reward, f"objective.rewards[{i}]", answer_regex or None)
        seen = kinds.count(kind)
        kinds.append(kind)
        names.append(f"{kind}_{seen + 1}" if seen else kind)
        functions.append(fn)
    return Rewards(names, functions, [reward.weight for reward in objective.rewards])
