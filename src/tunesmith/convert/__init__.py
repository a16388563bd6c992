"""`tunesmith convert`: an axolotl or LLaMA-Factory training YAML -> the equivalent tunesmith config.

    conversion = convert_file("qlora.yml")                  # which tool wrote it: told from its keys
    conversion = convert_file("lora_sft.yaml", tool="llamafactory", model="smollm2-135m-instruct")
    write_conversion(conversion, "tunesmith.yaml")          # validated, written atomically, never over the input
    for key, why in conversion.not_carried: print(why)      # every key that had no tunesmith equivalent, and why

The converted config holds only the keys the source set (and the source tool's defaults where they differ from
tunesmith's, each noted); at its top, comments say what it came from, what was not carried over and why, and which
values took a judgement.  It is validated by tunesmith's own config loader before anything is written.  Paths of
data files that are relative resolve from the source config's folder (both tools read them so) and are written
out absolute; `--model` and `--data` replace the model and data paths the source names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.config import Config, config_from_dict, load_config_text, read_config_file, read_yaml_text
from tunesmith.convert import axolotl, llamafactory
from tunesmith.convert.common import Builder
from tunesmith.errors import UserError, visible
from tunesmith.fileio import atomic_write_text

TOOLS = ("axolotl", "llamafactory")
TOOL_NAMES = {"axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}
# the top-level sections of a tunesmith config, in the order the converted config lists them
_ORDER = ("model", "method", "lora", "data", "objective", "training", "eval", "logging", "distributed", "output")


@dataclass
class Conversion:
    """A converted config: `config` (the tunesmith keys set), `carried` (each tunesmith key -> the source key it came
    from), and the source keys `not_carried` and carried with a judgement (`notes`), each (source key, the line
    that says why)."""
    tool: str
    source: Path
    config: dict
    carried: dict[str, str] = field(default_factory=dict)
    not_carried: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    same: list[str] = field(default_factory=list)  # source keys that ask for what tunesmith does anyway
    made: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M"))

    def yaml_text(self) -> str:
        """The converted config as YAML, with the comments that say where it came from."""
        lines = [f"# Converted by `tunesmith convert` from the {TOOL_NAMES[self.tool]} config",
                 f"#   {_comment(str(self.source))}",
                 f"# on {self.made}. Check it, then: tunesmith train THIS_FILE",
                 "#"]
        lines.append(f"# Not carried over ({len(self.not_carried)}):" if self.not_carried else
                     "# Every key of the source was carried over.")
        lines += [f"#   - {_comment(line)}" for _, line in self.not_carried]
        if self.notes:
            lines += ["#", f"# Carried with a judgement or a default ({len(self.notes)}):"]
            lines += [f"#   - {_comment(line)}" for _, line in self.notes]
        if self.same:
            lines += ["#", f"# What tunesmith does anyway: {_comment(', '.join(self.same))}"]
        body = yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
        return "\n".join(lines) + "\n\n" + body


def _comment(text: str) -> str:
    """One line of a YAML comment: printable, no line breaks."""
    return visible(text, 600)


def detect_tool(raw: dict, name: str = "the config") -> str:
    """Which tool wrote a config: the one more of whose marker keys it holds."""
    scores = {"axolotl": sum(key in raw for key in axolotl.MARKERS),
              "llamafactory": sum(key in raw for key in llamafactory.MARKERS)}
    if scores["axolotl"] == scores["llamafactory"]:
        if {"model", "data", "training"} & set(raw) and not any(scores.values()):
            raise UserError(f"{name} looks like a tunesmith config already (it has model:, data: or training:); train "
                            "it with tunesmith train.")
        raise UserError(f"{name}: cannot tell whether axolotl or LLaMA-Factory wrote it (it has "
                        f"{scores['axolotl']} of axolotl's usual keys such as base_model and datasets, and "
                        f"{scores['llamafactory']} of LLaMA-Factory's such as model_name_or_path and dataset); give "
                        "--from axolotl or --from llamafactory.")
    return max(scores, key=scores.get)


def convert_file(path: str | Path, tool: str | None = None, model: str | None = None,
                 data: list[str] | tuple[str, ...] = ()) -> Conversion:
    """Convert the axolotl or LLaMA-Factory YAML at `path` (`tool` says which; None: told from its keys).  `model`
    replaces the model it names, and `data` the paths of its data sets, in order.  A UserError names the key for a
    value it cannot carry at all (an unknown data set type, a stage tunesmith has no equivalent for)."""
    source = Path(path).expanduser().absolute()
    name = visible(str(path), 300)
    raw = read_yaml_text(read_config_file(source, "the axolotl or LLaMA-Factory YAML config to convert"), name)
    if not isinstance(raw, dict) or not raw:
        kind = "empty" if raw in (None, {}) else f"a {type(raw).__name__}, not a mapping of keys"
        raise UserError(f"{name} is {kind}; give an axolotl or LLaMA-Factory training config (a YAML mapping such as "
                        "base_model: ..., datasets: ...).")
    if tool is None:
        tool = detect_tool(raw, name)
    elif tool not in TOOLS:
        raise UserError(f"--from {visible(tool, 40)}: tunesmith converts configs of {' and '.join(TOOLS)}.")
    builder = Builder(tool=tool, raw=raw, source=source)
    data = [str(Path(p).expanduser().absolute()) for p in data]
    (axolotl.convert if tool == "axolotl" else llamafactory.convert)(builder, model, data)
    builder.finish()
    config = {section: _in_schema_order(section, builder.out[section]) for section in _ORDER if section in builder.out}
    conversion = Conversion(tool=tool, source=source, config=config, carried=dict(builder.origin),
                            not_carried=list(builder.not_carried), notes=list(builder.notes), same=list(builder.same))
    _validate(conversion, name)
    return conversion


def _in_schema_order(section: str, value):
    """A section's keys in the order tunesmith's schema (and `tunesmith train --help`'s README table) lists them."""
    if not isinstance(value, dict):
        return value
    fields = list(Config.model_fields[section].annotation.model_fields)
    return {key: value[key] for key in sorted(value, key=lambda k: fields.index(k) if k in fields else len(fields))}


def _validate(conversion: Conversion, name: str) -> None:
    """The converted config must load with tunesmith's own loader, from the very text that will be written, to
    the same config as the mapping it was made from; a value tunesmith refuses names the source key it came from."""
    try:
        expected = config_from_dict(conversion.config, "the converted config")
        loaded = load_config_text(conversion.yaml_text(), source="the converted config")
    except UserError as exc:
        sources = [f"{ours} comes from {theirs}" for ours, theirs in conversion.carried.items() if ours in str(exc)]
        raise UserError(f"{name}: a value is not valid in tunesmith: {exc}"
                        + (f" ({'; '.join(sources)}; fix it in the source config.)" if sources else "")) from None
    if loaded != expected:  # our bug: the YAML we write does not say what we built
        raise AssertionError(f"the converted YAML reads back differently: {loaded} != {expected}")


def write_conversion(conversion: Conversion, out: str | Path, force: bool = False) -> Path:
    """Write the converted config to `out` atomically; never over the source config, and over an existing `out`
    only with `force`."""
    out_path = Path(out).expanduser().absolute()
    shown = visible(str(out), 300)
    if out_path.exists() and out_path.resolve() == conversion.source.resolve():
        raise UserError(f"--out {shown} is the config being converted; give another file name (the source is never "
                        "written over).")
    if out_path.is_dir():
        raise UserError(f"--out {shown} is a folder; give a file name such as {shown}/tunesmith.yaml.")
    if out_path.exists() and not force:
        raise UserError(f"--out {shown} already exists; give another name, or --force to replace it.")
    try:
        atomic_write_text(out_path, conversion.yaml_text())
    except OSError as exc:
        raise UserError(f"--out {shown}: cannot be written ({exc.strerror or exc}).") from None
    return out_path
