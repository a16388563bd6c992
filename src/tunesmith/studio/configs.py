"""The train form, generated from the config schema (tunesmith.config's pydantic models): every key with its
default and description, method-specific sections shown only for their methods, and the YAML view that
round-trips with the form (form -> `--set` lines -> a validated Config -> YAML of the keys that differ from the
defaults, and back)."""

from __future__ import annotations

import typing
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from tunesmith import api
from tunesmith.config import Config

# Sections the form leaves out: distillation has its own command (`tunesmith distill`), and output.dir and
# the process layout are the studio's to choose.
HIDDEN = {"teacher", "student", "distill", "distributed", "output"}
# Sections shown only for some methods (the rest apply to all).
FOR_METHODS = {
    "lora": ["lora", "qlora", "dora", "rslora", "adalora"],
    "qlora": ["qlora"],
    "adalora": ["adalora"],
}


def _members(annotation: Any) -> list:
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    return [annotation]


def _kind(annotation: Any) -> tuple[str, list]:
    """How a key is edited: ("choice", choices), ("bool", []), ("number", []) or ("text", [])."""
    members = _members(annotation)
    choices: list = []
    for m in members:
        if typing.get_origin(m) is Literal:
            choices += list(typing.get_args(m))
        elif m is bool:
            choices += [True, False]
    others = [m for m in members if typing.get_origin(m) is not Literal and m not in (bool, type(None))]
    if choices and not others:
        return ("bool" if choices == [True, False] else "choice"), [_text(c) for c in choices]
    if others and all(m in (int, float) for m in others) and not choices:
        return "number", []
    return "text", [_text(c) for c in choices]


def _text(value: Any) -> str:
    """A value as the form shows it and `--set` reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):  # a list entry with keys of its own (objective.rewards): only what it sets
        value = value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, list):
        value = [v.model_dump(mode="json", exclude_defaults=True) if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def form_sections() -> list[dict]:
    """[{name, methods (None: every method), keys: [{key, kind, choices, default, description}]}]."""
    sections = []
    defaults = Config()
    top = {"key": "method", "kind": "choice", "default": defaults.method, "description": Config.model_fields["method"].description or "",
           "choices": list(typing.get_args(Config.model_fields["method"].annotation))}
    sections.append({"name": "method", "methods": None, "keys": [top]})
    for name, info in Config.model_fields.items():
        model = info.annotation
        if name in HIDDEN or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        section_default = getattr(defaults, name)
        keys = []
        for key, field in model.model_fields.items():
            kind, choices = _kind(field.annotation)
            keys.append({"key": f"{name}.{key}", "kind": kind, "choices": choices,
                         "default": _text(getattr(section_default, key)), "description": field.description or ""})
        sections.append({"name": name, "methods": FOR_METHODS.get(name), "keys": keys})
    return sections


def config_from_form(values: dict[str, str]) -> Config:
    """The Config the form's fields say (each field read as `--set KEY=VALUE` reads it)."""
    return api.load_config(None, [f"{key}={value}" for key, value in values.items()])


def changed(cfg: Config) -> dict:
    """The keys of `cfg` that differ from the defaults, as a nested mapping."""
    def diff(now: dict, default: dict) -> dict:
        out = {}
        for key, value in now.items():
            if isinstance(value, dict) and isinstance(default.get(key), dict):
                inner = diff(value, default[key])
                if inner:
                    out[key] = inner
            elif value != default.get(key):
                out[key] = value
        return out
    return diff(cfg.model_dump(mode="json"), Config().model_dump(mode="json"))


def short_yaml(cfg: Config) -> str:
    """The YAML view: only what differs from the defaults, in the schema's order."""
    return yaml.safe_dump(changed(cfg), sort_keys=False, allow_unicode=True) if changed(cfg) else "{}\n"


def form_values(cfg: Config) -> dict[str, str]:
    """Every form field's text for `cfg`."""
    values = {"method": cfg.method}
    for section in form_sections()[1:]:
        part = getattr(cfg, section["name"])
        for entry in section["keys"]:
            values[entry["key"]] = _text(getattr(part, entry["key"].split(".", 1)[1]))
    return values


def flat_changes(cfg: Config) -> dict[str, Any]:
    """`changed` with dotted keys (what the compare page sets side by side)."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(cfg.model_dump(mode="json"), "")
    return out
