"""What the axolotl and LLaMA-Factory converters share: the config being built, with what each source key became
(`Builder`), the names both tools take from Hugging Face's Trainer (optimisers, schedulers, trackers), paths of the
source's own files, and data sets as tunesmith sources.

A converter reads every top-level key of the source exactly once, through `Builder.take`, and each key ends in
one of three places: carried (into the tunesmith config, perhaps with a note saying what judgement it took), not
carried (with the reason), or, for a key left empty (`key:` or `key: null`, which sets nothing in either tool),
nowhere.  `Builder.finish` lists every key no rule took as not carried, so nothing is dropped without a line.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import MAX_TIMEOUT_S
from tunesmith.errors import UserError, visible

# The roles tunesmith's readers take (data/formats.py: CHAT_ROLES for `messages`, SHAREGPT_ROLES for `sharegpt`;
# the convert layer sits below data/, so the names are repeated here and tests/test_convert.py checks they agree).
MESSAGE_ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = ("human", "user", "gpt", "assistant", "model", "system")

# A key whose name says it holds a secret: its value is never printed or written into the converted config.
_SECRET = re.compile(r"(^|_)(token|api_key|secret|password|webhook_url)$", re.IGNORECASE)

# A hub id (`owner/name`) as opposed to a relative path, and the file endings that make it a path after all.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".tsv", ".gz")

# dataset_info.json (LLaMA-Factory) is a few hundred KB with every built-in data set; ten times that is a mistake.
MAX_INFO_BYTES = 16 * 1024 * 1024


@dataclass
class Source:
    """One data set as tunesmith reads it: `path` (absolute for a local file, else a hub id), the `format` (None:
    auto, as for preference rows, whose format the columns tell) and the `columns` map (our field -> theirs)."""
    path: str
    key: str  # the source key it came from, e.g. datasets[0] or dataset: alpaca_demo
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    system_prompt: str | None = None
    split: str | None = None
    weight: float | None = None
    rows: int | None = None
    local: bool = True


@dataclass
class Builder:
    """The tunesmith config being built from a source config of `tool`, found in `config_dir`."""
    tool: str  # "axolotl" or "llamafactory"
    raw: dict
    source: Path  # the source config file
    out: dict = field(default_factory=dict)
    not_carried: list[tuple[str, str]] = field(default_factory=list)  # (source key, why)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (source key, the judgement taken)
    same: list[str] = field(default_factory=list)  # source keys whose value is what tunesmith does anyway
    origin: dict[str, str] = field(default_factory=dict)  # tunesmith key -> the source key that set it
    taken: set[str] = field(default_factory=set)  # the keys a rule has read
    known: set[str] = field(default_factory=set)  # every key the rules know, set or not (for "did you mean")

    @property
    def name(self) -> str:
        return {"axolotl": "axolotl", "llamafactory": "LLaMA-Factory"}[self.tool]

    # --- reading the source

    def take(self, key: str, default: Any = None) -> Any:
        """The source's value of top-level `key` (default when absent), marked as read."""
        self.taken.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    # --- writing the tunesmith config

    def put(self, dotted: str, value: Any, key: str) -> None:
        """Set tunesmith key `dotted` (e.g. training.learning_rate) to `value`, from source key `key`."""
        parts = dotted.split(".")
        node = self.out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        self.origin[dotted] = key

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.out
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def drop(self, key: str, reason: str, value: Any = ...) -> None:
        """Source key `key` is not carried over, because `reason` (a clause: what tunesmith does instead)."""
        shown = "" if value is ... else f": {shown_value(key, value)}"
        self.not_carried.append((key, f"{visible(key, 120)}{shown} — {reason}"))

    def agree(self, key: str) -> None:
        """Source key `key` asks for what tunesmith does without a setting (model_type: AutoModelForCausalLM)."""
        if key not in self.same:
            self.same.append(key)

    def note(self, key: str, text: str) -> None:
        self.notes.append((key, f"{visible(key, 120)}: {text}"))

    def finish(self) -> None:
        """List every top-level key that no rule read as not carried: a key this converter does not know (with the
        nearest key it knows, for a typo)."""
        known = sorted(self.taken | self.known)
        for key, value in self.raw.items():
            if key not in self.taken:
                near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.8)
                hint = f"; did you mean {near[0]}?" if near else " (a typo, or an option of a newer version)"
                article = "an" if self.name[0].lower() in "aeiou" else "a"
                self.drop(str(key), f"not {article} {self.name} key tunesmith's converter knows{hint}", value)

    def carry_number(self, key: str, dotted: str, whole: bool = False, default: int | float | None = None,
                     default_from: str | None = None) -> int | float | None:
        """Carry the number the source gives under `key` into tunesmith key `dotted`.  Absent: `default` (the source
        tool's own default, where it differs from tunesmith's), noted as `default_from` ("LLaMA-Factory's default"
        unless told), or nothing.  Returns what was set."""
        if self.has(key):
            value = self.number(key, self.take(key), whole=whole)
        else:
            self.take(key)
            if default is None:
                return None
            value = default
            self.note(key, f"not in the source; {default_from or self.name + chr(39) + 's default'} {default} -> "
                      f"{dotted}: {default}")
        self.put(dotted, value, key)
        return value

    # --- values

    def number(self, key: str, value: Any, whole: bool = False) -> int | float:
        """A number the source gave (as a number, or as text such as "1e-4", which YAML 1.1 readers leave as
        text); a whole number when `whole`; a sentence naming the key otherwise."""
        if isinstance(value, str):
            try:
                value = float(value.strip()) if not re.fullmatch(r"\s*[-+]?\d+\s*", value) else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{self.where()}: `{visible(key, 120)}` is {shown_value(key, value)}, not a number; fix "
                            "it in the source config.")
        if whole:
            if isinstance(value, float) and not value.is_integer():
                raise UserError(f"{self.where()}: `{visible(key, 120)}` is {value}, not a whole number; fix it in the "
                                "source config.")
            return int(value)
        return value

    def flag(self, key: str, value: Any) -> bool:
        """true/false, also written as text ("true", "False")."""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise UserError(f"{self.where()}: `{visible(key, 120)}` is {shown_value(key, value)}, not true or false; "
                            "fix it in the source config.")
        return value

    def text(self, key: str, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{self.where()}: `{visible(key, 120)}` is {shown_value(key, value)}; it must be text.")
        return value.strip()

    def where(self) -> str:
        return visible(str(self.source), 300)

    @property
    def config_dir(self) -> Path:
        return self.source.parent

    # --- paths

    def local_path(self, value: str) -> Path:
        """A path the source gives, resolved as both tools resolve their own data and model paths that are
        relative: here, from the source config's folder (so the converted config works from any folder)."""
        path = Path(os.path.expanduser(value))
        return Path(os.path.normpath(path if path.is_absolute() else self.config_dir / path))

    def data_path(self, value: str) -> tuple[str, bool]:
        """(the path, whether it is local) of a data set the source names: a file or folder (relative paths from
        the source config's folder), or else a hub data set id (`owner/name`) kept as given."""
        path = self.local_path(value)
        if path.exists():
            return str(path), True
        if _HUB_ID.fullmatch(value) and not value.lower().endswith(_DATA_SUFFIXES):
            return value, False
        return str(path), True

    def model_name(self, value: str, key: str) -> str:
        """A model: a local folder (relative paths from the source config's folder) or a hub id, kept as given."""
        path = self.local_path(value)
        if path.exists():
            return str(path)
        self.note(key, f"'{visible(value, 200)}' is no local folder: kept as given, a built-in name or a hub id "
                  "(found in the hub cache, or downloaded where the network allows; --model NAME trains another model)")
        return value


def shown_value(key: str, value: Any) -> str:
    """A source value in a sentence: short, printable, and hidden when the key names a secret."""
    if _SECRET.search(str(key)):
        return "(hidden: it names a secret)"
    if isinstance(value, str):
        return f"'{visible(value, 80)}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = str(value)
        return visible(text, 80)
    return visible(value, 80)


def read_json_file(path: Path, key: str) -> Any:
    """A JSON file the source config points to (LLaMA-Factory's dataset_info.json), or a sentence naming it."""
    name = visible(str(path), 300)
    try:
        if not path.is_file():
            raise UserError(f"{key}: {name} is not a file.")
        if path.stat().st_size > MAX_INFO_BYTES:
            raise UserError(f"{key}: {name} is over {MAX_INFO_BYTES >> 20} MiB; it should describe data sets, "
                            "not hold them.")
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}: {name}, line {exc.lineno}: not valid JSON ({visible(exc.msg, 100)}); fix it.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{key}: {name} cannot be read ({visible(str(exc), 200)}).") from None


# --- names both tools take from Hugging Face's Trainer (transformers' OptimizerNames and SchedulerType)

# tunesmith's three optimisers (config.py: training.optimizer); every AdamW implementation is the same update
_SAME_OPTIMIZER = {
    "adamw": "adamw", "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
    "adamw_apex_fused": "adamw", "adamw_torch_xla": "adamw", "adamw_torch_npu_fused": "adamw", "optimi_adamw": "adamw",
    "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
}
_NEAR_OPTIMIZER = {
    "paged_adamw_32bit": ("adamw", "32-bit AdamW whose state bitsandbytes pages to CPU memory under pressure; tunesmith's "
                          "adamw keeps the same 32-bit state on the device (or paged_adamw_8bit pages 8-bit state)"),
    "paged_adamw": ("adamw", "paged 32-bit AdamW; tunesmith's adamw keeps the same state without paging"),
    "adamw_torch_4bit": ("adamw_8bit", "torchao's 4-bit AdamW; tunesmith's nearest is bitsandbytes' 8-bit AdamW"),
    "ao_adamw_4bit": ("adamw_8bit", "torchao's 4-bit AdamW; tunesmith's nearest is bitsandbytes' 8-bit AdamW"),
    "ao_adamw_8bit": ("adamw_8bit", "torchao's 8-bit AdamW; tunesmith's 8-bit AdamW is bitsandbytes'"),
}


def optimizer(builder: Builder, key: str) -> None:
    name = builder.take(key)
    if name is not None:
        _named(builder, key, builder.text(key, name), "training.optimizer", _SAME_OPTIMIZER, _NEAR_OPTIMIZER, "adamw",
               "tunesmith trains with AdamW, 8-bit AdamW or paged 8-bit AdamW; the learning rate tuned for another "
               "optimiser may need tuning again")


def _named(builder: Builder, key: str, name: str, dotted: str, same: dict[str, str],
           near: dict[str, tuple[str, str]], fallback: str, why_fallback: str) -> None:
    """A name the source tool gives (an optimiser, a schedule) as tunesmith's: the same thing under another name,
    a near one (noted with what differs), or tunesmith's `fallback` (noted with `why_fallback`)."""
    low = name.lower()
    if low in same:
        builder.put(dotted, same[low], key)
        return
    ours, why = near.get(low, (fallback, why_fallback))
    builder.put(dotted, ours, key)
    builder.note(key, f"{visible(name, 60)} -> {dotted}: {ours} ({why})")


_NEAR_SCHEDULER = {
    "cosine_with_restarts": ("cosine", "one cosine decay to 0, without restarts"),
    "cosine_with_min_lr": ("cosine", "decays to 0, not to a minimum learning rate"),
    "cosine_warmup_with_min_lr": ("cosine", "decays to 0, not to a minimum learning rate"),
    "polynomial": ("linear", "the default power 1.0 is a straight line; another power is not kept"),
    "warmup_stable_decay": ("linear", "no stable phase: a straight line down from the end of warmup"),
}


def scheduler(builder: Builder, key: str, default: str | None = None) -> None:
    name = builder.take(key)
    if name is None:
        if default is not None and default != "cosine":  # cosine is tunesmith's default too
            builder.put("training.lr_scheduler", default, key)
            builder.note(key, f"not in the source; {builder.name}'s default {default} -> training.lr_scheduler: "
                         f"{default}")
        return
    # tunesmith warms up (warmup_steps/ratio) before every schedule, so constant_with_warmup is its constant
    same = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
    _named(builder, key, builder.text(key, name), "training.lr_scheduler", same, _NEAR_SCHEDULER, "cosine",
           "tunesmith's schedules are cosine, linear and constant after warmup")


def model_and_code(b: Builder, key: str, model: str | None) -> None:
    """The model the source names under `key` (or `model`, from --model), and its trust_remote_code, which is not
    carried: tunesmith runs code shipped with a model only when its own config says so."""
    name = b.take(key)
    if model:
        b.put("model.name", model, "--model")
        if name is not None:
            b.note(key, f"{shown_value(key, name)} -> model.name: {visible(model, 100)} (--model)")
    elif name is not None:
        b.put("model.name", b.model_name(b.text(key, name), key), key)
    else:
        raise UserError(f"{b.where()}: {key} is missing, so there is no model to train; add it, or give --model NAME.")
    if b.take("trust_remote_code") not in (None, False):
        b.drop("trust_remote_code", "tunesmith runs no code shipped with a model unless you set "
               "model.trust_remote_code: true yourself", True)


def add_tracker(builder: Builder, tracker: str, key: str) -> None:
    """Report to `tracker` (tensorboard, mlflow, wandb) as well (logging.report_to)."""
    trackers = builder.get("logging.report_to", [])
    if tracker not in trackers:
        builder.put("logging.report_to", [*trackers, tracker], key)


def put_once(builder: Builder, dotted: str, value: Any, key: str) -> None:
    """Set `dotted` unless another source key already set it to something else (then this one is not carried)."""
    current = builder.get(dotted)
    if current is not None and current != value:
        builder.drop(key, f"{dotted} already comes from {builder.origin.get(dotted, 'another key')}, and tunesmith "
                     "has one", value)
        return
    builder.put(dotted, value, key)


def precision(builder: Builder, bf16: str, fp16: str) -> None:
    """bf16/fp16 mixed precision: tunesmith's model.dtype auto is bf16 (fp16 where bf16 is slow) on GPUs and
    fp32 on CPUs, which is what a config written for a GPU meant; an explicit dtype would force it on a CPU too."""
    wants = [key for key in (bf16, fp16) if key in builder.raw]
    values = {key: builder.take(key) for key in wants}
    on = [key for key, value in values.items() if value not in (None, False, "false", "False")]
    if on:
        builder.put("model.dtype", "auto", on[0])
        builder.note(on[0], f"{shown_value(on[0], values[on[0]])} -> model.dtype: auto (bf16 or fp16 on a GPU, as asked; "
                     "fp32 on a CPU, where 16-bit is slow; set model.dtype to force one)")
    elif wants:
        builder.note(wants[0], "16-bit precision off in the source (fp32); tunesmith's model.dtype: auto picks bf16/fp16 "
                     "on GPUs: set model.dtype: float32 to keep fp32 there")


def sources_to_data(builder: Builder, sources: list[Source], replacements: list[str], key: str) -> None:
    """Write the data sets into the config: one as data.path/format/columns (the common case), several (or one that
    needs a split, a weight or a row count) as data.sources.  `replacements` (--data) stand for the paths, in order."""
    if replacements:
        if len(replacements) != len(sources):
            raise UserError(f"--data was given {len(replacements)} time{'s' * (len(replacements) != 1)}, but "
                            f"{visible(key, 60)} names {len(sources)} data set{'s' * (len(sources) != 1)}; give one "
                            "--data PATH for each, in the order the source config lists them.")
        for source, path in zip(sources, replacements):
            builder.note(source.key, f"the data path {visible(source.path, 120)} -> {visible(path, 120)} (--data)")
            source.path, source.local = path, True
    for source in sources:
        if source.local and not Path(source.path).exists():
            builder.note(source.key, f"{visible(source.path, 200)} does not exist yet; put the file there or give "
                         "--data PATH")
        elif not source.local:
            builder.note(source.key, f"'{visible(source.path, 200)}' is no local path: kept as a hub data set id (read "
                         "where the network allows; --data PATH gives a local file instead)")
    if len(sources) == 1 and sources[0].split in (None, "train") and sources[0].weight is None \
            and sources[0].rows is None:
        one = sources[0]
        builder.put("data.path", one.path, one.key)
        if one.format:
            builder.put("data.format", one.format, one.key)
        if one.columns:
            builder.put("data.columns", dict(one.columns), one.key)
        if one.system_prompt is not None:
            builder.put("data.system_prompt", one.system_prompt, one.key)
        return
    entries = []
    for source in sources:
        entry: dict[str, Any] = {"path": source.path}
        if source.format:
            entry["format"] = source.format
        if source.columns:
            entry["columns"] = dict(source.columns)
        if source.system_prompt is not None:
            entry["system_prompt"] = source.system_prompt
        if source.split not in (None, "train"):
            entry["split"] = source.split
        if source.weight is not None:
            entry["weight"] = source.weight
        if source.rows is not None:
            entry["rows"] = source.rows
        entries.append(entry)
    builder.put("data.sources", entries, key)


def role_names(builder: Builder, key: str, fmt: str, names: list[str]) -> None:
    """Refuse role names that tunesmith's `fmt` reader would refuse row by row: better one sentence now."""
    allowed = MESSAGE_ROLES if fmt == "messages" else SHAREGPT_ROLES
    bad = [name for name in names if str(name).strip().lower() not in allowed]
    if bad:
        raise UserError(f"{builder.where()}: {visible(key, 120)} names the role "
                        f"{', '.join(repr(visible(b, 40)) for b in bad)}, and tunesmith's {fmt} rows take the roles "
                        f"{', '.join(allowed)}; rename those roles in the data (tool and function turns have no "
                        "tunesmith equivalent).")


def is_off(value: Any) -> bool:
    """A value that turns an option off or leaves it unset: what tunesmith does without the option."""
    return value is None or value is False or value in ("", "false", "False", "none", "None") or value == [] \
        or value == {}


def drop_known(builder: Builder, reasons: dict[str, str]) -> None:
    """Source keys tunesmith has no equivalent for, each with the reason; a key set to false or left empty asks for
    nothing, so it is not listed."""
    builder.known |= set(reasons)
    for key, reason in reasons.items():
        if key in builder.raw and key not in builder.taken:
            value = builder.take(key)
            if not is_off(value):
                builder.drop(key, reason, value)


def drop_matching(builder: Builder, patterns: list[tuple[str, str]]) -> None:
    """drop_known for families of keys (`relora_*`, `comet_*`), by regular expression."""
    for key in list(builder.raw):
        if key in builder.taken:
            continue
        for pattern, reason in patterns:
            if re.search(pattern, str(key)):
                value = builder.take(key)
                if not is_off(value):
                    builder.drop(key, reason, value)
                break


def without_same(columns: dict[str, str]) -> dict[str, str]:
    """A column map without the fields whose column already has our name."""
    return {ours: theirs for ours, theirs in columns.items() if theirs and ours != theirs}


def trainer_keys(builder: Builder) -> None:
    """The keys axolotl and LLaMA-Factory both take from Hugging Face's TrainingArguments, with the same meaning."""
    b = builder
    numbers = [("learning_rate", "training.learning_rate", False), ("warmup_steps", "training.warmup_steps", True),
               ("warmup_ratio", "training.warmup_ratio", False), ("weight_decay", "training.weight_decay", False),
               ("adam_beta1", "training.adam_beta1", False), ("adam_beta2", "training.adam_beta2", False),
               ("adam_epsilon", "training.adam_epsilon", False),
               ("gradient_accumulation_steps", "training.gradient_accumulation", True),
               ("save_total_limit", "training.save_total_limit", True),
               ("early_stopping_patience", "training.early_stopping_patience", True)]
    for key, dotted, whole in numbers:
        if b.has(key):
            b.put(dotted, b.number(key, b.take(key), whole), key)
        b.take(key)
    if b.has("max_steps"):
        steps = b.number("max_steps", b.take("max_steps"), whole=True)
        if steps > 0:  # -1 (the Trainer's default) and 0: no limit
            b.put("training.max_steps", steps, "max_steps")
    b.take("max_steps")
    if b.has("seed"):
        seed = b.number("seed", b.take("seed"), whole=True)
        b.put("training.seed", seed, "seed")
        b.put("data.seed", seed, "seed")  # both tools seed the validation split with the same seed
    if b.has("max_grad_norm"):
        norm = b.number("max_grad_norm", b.take("max_grad_norm"))
        b.put("training.max_grad_norm", norm if norm > 0 else None, "max_grad_norm")
        if norm <= 0:
            b.note("max_grad_norm", f"{norm} (no clipping) -> training.max_grad_norm: null")
    b.take("max_grad_norm")
    for key, dotted in (("eval_steps", "training.eval_steps"), ("save_steps", "training.save_steps")):
        if b.has(key):
            value = b.number(key, b.take(key))
            if value >= 1 and float(value).is_integer():
                b.put(dotted, int(value), key)
            else:
                b.drop(key, f"a share of the run's steps; tunesmith takes a number of steps ({dotted})", value)
        b.take(key)
    if b.has("gradient_checkpointing"):
        value = b.take("gradient_checkpointing")
        if isinstance(value, str) and value.lower().startswith("offload"):
            b.put("training.gradient_checkpointing", True, "gradient_checkpointing")
            b.note("gradient_checkpointing", f"'{visible(value, 40)}' -> training.gradient_checkpointing: true "
                   "(the activations stay in memory; tunesmith does not offload them)")
        else:
            b.put("training.gradient_checkpointing", b.flag("gradient_checkpointing", value), "gradient_checkpointing")
    b.take("gradient_checkpointing")
    if b.has("load_best_model_at_end"):
        b.put("training.load_best_at_end", b.flag("load_best_model_at_end", b.take("load_best_model_at_end")),
              "load_best_model_at_end")
    b.take("load_best_model_at_end")
    if b.has("ddp_timeout"):
        seconds = b.number("ddp_timeout", b.take("ddp_timeout"))
        if seconds > 0:
            b.put("distributed.timeout_s", min(seconds, MAX_TIMEOUT_S), "ddp_timeout")
            if seconds > MAX_TIMEOUT_S:
                b.note("ddp_timeout", f"{seconds:g} s -> distributed.timeout_s: {MAX_TIMEOUT_S} (a week, tunesmith's "
                       "longest wait at a collective step)")
    b.take("ddp_timeout")
    if b.has("output_dir"):
        b.put("output.dir", b.text("output_dir", b.take("output_dir")), "output_dir")
    b.take("output_dir")
    if b.has("save_safetensors"):
        if b.take("save_safetensors") in (False, "false", "False"):
            b.drop("save_safetensors", "tunesmith writes safetensors only", False)
        else:
            b.agree("save_safetensors")
    b.take("save_safetensors")
    drop_known(b, TRAINER_DROPPED)


TRAINER_DROPPED = {
    "tf32": "tunesmith leaves TF32 matmuls at PyTorch's default (off); model.dtype: auto trains in bf16 on GPUs",
    "logging_steps": "tunesmith logs every step (metrics.jsonl and the console)",
    "save_only_model": "tunesmith's checkpoints keep the optimiser state, so a run can resume",
    "resume_from_checkpoint": "tunesmith resumes a run of its own: tunesmith train RUN/config.yaml --resume",
    "torch_compile": "tunesmith does not torch.compile the model", "torch_compile_backend": "as torch_compile",
    "neftune_noise_alpha": "tunesmith adds no noise to the embeddings (NEFTune)",
    "hub_model_id": "tunesmith pushes nothing to a hub; the run folder holds the weights (tunesmith merge, export)",
    "hub_strategy": "as hub_model_id", "push_to_hub": "as hub_model_id", "hub_private_repo": "as hub_model_id",
    "hub_token": "tunesmith uses the hub login of the environment",
    "group_by_length": "tunesmith keeps a seeded random order of rows",
    "auto_find_batch_size": "tunesmith estimate says what fits, and tunesmith train checks the fit before it starts",
    "ddp_find_unused_parameters": "tunesmith sets DDP's arguments itself",
    "ddp_bucket_cap_mb": "tunesmith sets DDP's arguments itself",
    "ddp_broadcast_buffers": "tunesmith sets DDP's arguments itself",
    "dataloader_num_workers": "tunesmith batches in the training process",
    "dataloader_pin_memory": "tunesmith batches in the training process",
    "include_tokens_per_second": "tunesmith logs tokens per second every step",
    "local_rank": "set by the launcher (tunesmith train --nproc, torchrun)",
    "deepspeed": "a DeepSpeed JSON is not read; run tunesmith train --nproc N with distributed.strategy: deepspeed and "
    "distributed.zero_stage: 2 or 3",
    "fsdp": "run tunesmith train --nproc N with distributed.strategy: fsdp",
    "fsdp_config": "tunesmith's FSDP2 takes no settings beyond distributed.strategy: fsdp",
    "label_smoothing_factor": "tunesmith's cross-entropy has no label smoothing",
    "metric_for_best_model": "tunesmith judges checkpoints by validation loss",
    "greater_is_better": "tunesmith judges checkpoints by validation loss (lower is better)",
}


def held_out(b: Builder, key: str) -> None:
    """val_set_size (axolotl) or val_size (LLaMA-Factory): a share of the rows, or a count of rows."""
    value = b.take(key)
    share = b.number(key, value) if value is not None else 0
    if 0 < share < 1:
        b.put("data.validation_split", share, key)
    elif share == 0:
        b.put("data.validation_split", 0.0, key)
        b.put("eval.enabled", False, key)
        b.note(key, f"{'not in the source' if value is None else '0'}: no rows are held out, as in {b.name} -> "
               "data.validation_split: 0.0 and eval.enabled: false (set data.validation_split: 0.1 and "
               "eval.enabled: true for tunesmith's base-vs-tuned comparison)")
    else:
        b.drop(key, "a number of rows; tunesmith holds out a share of them (data.validation_split, 0.1 by default)",
               value)


def same_strategies(b: Builder, strategy: Any) -> None:
    """eval_strategy (read by the caller) and save_strategy: at epoch ends and every N steps, as tunesmith does."""
    key = "eval_strategy" if "eval_strategy" in b.raw else "evaluation_strategy"
    if strategy == "no":
        b.put("training.eval_each_epoch", False, key)
    elif strategy in ("epoch", "steps"):
        b.agree(key)
    elif strategy is not None:
        b.drop(key, "tunesmith validates at each epoch end and every training.eval_steps steps", strategy)
    saving = b.take("save_strategy")
    if saving in ("epoch", "steps"):
        b.agree("save_strategy")
    elif saving is not None:
        b.drop("save_strategy", "tunesmith saves a checkpoint at each epoch end and every training.save_steps steps",
               saving)
