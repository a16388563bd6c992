"""A sweep's search space: SPACE.yaml maps dotted config keys to what a trial may set them to.

    training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}   # a number, log-uniform
    lora.dropout: {low: 0.0, high: 0.2}                               # a number, uniform
    lora.alpha: {low: 8, high: 64, step: 8}                           # a whole number: both bounds are whole
    lora.r: [4, 8, 16]                                                # one of these
    method: [lora, dora]

`read_space` checks the file's shape (a sentence naming the file and key for anything else); `check_space`
loads the config with each bound and each choice as a `--set` line, so a key the config does not have or a
value its schema refuses is found before any trial runs.  A trial passes its values to `tunesmith train` as
`--set KEY=VALUE` lines (config's `set_line`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import load_config, read_yaml_text, set_line
from tunesmith.errors import UserError, visible

# A space names a few keys (the example has five lines); 64 KiB is room for thousands of them.
MAX_SPACE_BYTES = 64 * 1024
RANGE_KEYS = ("low", "high", "log", "step")

@dataclass(frozen=True)
class Param:
    """One key of the space: `kind` "choice" (one of `choices`), "int" or "float" (`low` to `high`, both
    included; `step` apart when given; spread on a log scale with `log`)."""

    key: str
    kind: str
    choices: tuple = ()
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False

    def suggest(self, trial) -> Any:
        """This key's value for an Optuna trial (drawn by its sampler, or the value a queued trial holds)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def edge_values(self) -> list:
        """The values that stand for the whole range when checking it against the schema: every choice, or
        the two bounds (the schema's limits on a number are bounds too)."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def to_json(self) -> Any:
        if self.kind == "choice":
            return list(self.choices)
        shown: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.step is not None:
            shown["step"] = self.step
        if self.log:
            shown["log"] = True
        return shown


def read_space(path: str | Path) -> list[Param]:
    """The search space in the YAML file at `path`, or a UserError naming the file (and the key) and what to
    write instead."""
    name = visible(str(path), 300)
    data = _load_yaml(Path(path), name)
    if not isinstance(data, dict) or not data:
        raise UserError(f"{name}: a search space is a mapping of config keys to ranges or choices, e.g. "
                        "`training.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}` and `lora.r: [4, 8, 16]` "
                        "(see examples/sweep-space.yaml).")
    return [_param(name, key, value) for key, value in data.items()]


def _load_yaml(path: Path, name: str) -> Any:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{name}: no such space file; give the YAML file of the search space, e.g. "
                        "--space examples/sweep-space.yaml.") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{name}: cannot look at this path ({visible(str(exc), 200)}).") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{name} is not a regular file; give the YAML file of the search space.")
    if info.st_size > MAX_SPACE_BYTES:
        raise UserError(f"{name} is over {MAX_SPACE_BYTES // 1024} KiB, and a search space is a few lines "
                        "(examples/sweep-space.yaml); is this the right file?")
    try:
        data = path.read_bytes()[:MAX_SPACE_BYTES + 1]
        text = data.decode("utf-8-sig")
    except OSError as exc:
        raise UserError(f"{name}: cannot be read ({exc.strerror or exc}).") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{name}: byte {exc.start} is not UTF-8; save the file as UTF-8 text.") from None
    return read_yaml_text(text, name)  # read as a config file is (YAML 1.2 floats, keys given twice refused)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(name: str, key: Any, value: Any) -> Param:
    """One line of the space file as a Param, or a sentence naming the file and key."""
    if not isinstance(key, str) or not key.strip() or any(not part.strip() for part in key.split(".")):
        raise UserError(f"{name}: `{visible(key, 100)}` is not a config key; write dotted keys such as "
                        "training.learning_rate or lora.r.")
    where = f"{name}, key `{visible(key, 100)}`"
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: the list of choices is empty; give at least one value, e.g. [4, 8, 16].")
        for choice in value:
            if choice is not None and not isinstance(choice, (str, int, float, bool)):
                raise UserError(f"{where}: a choice is a single value (text, a number, true/false or null), "
                                f"not {visible(repr(choice), 100)}.")
        if len({json.dumps(choice) for choice in value}) < len(value):
            raise UserError(f"{where}: a choice is listed twice; list each value once.")
        return Param(key, "choice", choices=tuple(value))
    if isinstance(value, dict):
        unknown = [k for k in value if k not in RANGE_KEYS]
        if unknown:
            raise UserError(f"{where}: {visible(unknown[0], 60)} is not part of a range; a range takes low, high "
                            "and optionally log: true or step.")
        low, high, step, log = value.get("low"), value.get("high"), value.get("step"), value.get("log", False)
        if not (_is_number(low) and _is_number(high)):
            raise UserError(f"{where}: a range needs numbers `low` and `high`, e.g. {{low: 1.0e-5, high: 1.0e-3}}.")
        if not low < high:
            raise UserError(f"{where}: low ({low}) must be below high ({high}); for one fixed value use "
                            f"--set {visible(key, 100)}=VALUE instead.")
        if not isinstance(log, bool):
            raise UserError(f"{where}: log is true or false.")
        if step is not None and (not _is_number(step) or step <= 0):
            raise UserError(f"{where}: step must be a number above 0.")
        if log and low <= 0:
            raise UserError(f"{where}: a log scale needs low above 0 (low is {low}).")
        if log and step is not None:
            raise UserError(f"{where}: give step or log: true, not both (a log scale has no even steps).")
        whole = isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int))
        if whole and (high - low) % (step or 1):
            raise UserError(f"{where}: high - low ({high - low}) is not a multiple of step ({step}); move high "
                            "so the last step lands on it.")
        return Param(key, "int" if whole else "float", low=low, high=high, step=step, log=log)
    raise UserError(f"{where}: give a range ({{low: ..., high: ...}}, with log: true or step: ... if wanted) or a "
                    f"list of choices ([4, 8, 16]), not {visible(repr(value), 100)}; for one fixed value use "
                    f"--set {visible(key, 100)}=VALUE.")


def check_space(space: Sequence[Param], space_path: str | Path, config_path: str | Path | None,
                overrides: Sequence[str] = ()) -> None:
    """Load the config with each key's bounds or choices (one at a time, then every key at its first value),
    so a key the config does not have or a value its schema refuses is a sentence naming the space file and
    the key before any trial runs."""
    name = visible(str(space_path), 300)
    for param in space:
        if param.key.split(".")[0] == "output":
            raise UserError(f"{name}, key `{visible(param.key, 100)}`: the sweep puts each trial's run folder under "
                            "its own folder (--output); leave output.* out of the space.")
        for value in param.edge_values():
            try:
                load_config(config_path, [*overrides, set_line(param.key, value)])
            except UserError as exc:
                raise UserError(f"{name}, key `{visible(param.key, 100)}` = {visible(json.dumps(value), 100)}: "
                                f"{exc}") from None
    try:
        load_config(config_path, [*overrides, *(set_line(p.key, p.edge_values()[0]) for p in space)])
    except UserError as exc:
        raise UserError(f"{name}: the first values of its keys together are refused: {exc}") from None
