"""Fuzzing the config: whatever a config file or a `--set` line holds, it loads or it says what is wrong.

The property, for generated configs (the real sections and keys mixed with random ones, values of every
YAML type: huge whole numbers, NaN, infinities, booleans, null, lists, mappings, unicode and control
characters) written as YAML or spoiled into bytes that are not, for generated `--set` lines, and for a
corpus of hand-made hostile files (UTF-16, Latin-1, a byte-order mark, NUL bytes, a folder, a named pipe,
a YAML bomb, nesting thousands deep, a key given twice, `!!python/object`): `load_config` returns a Config
or raises a UserError; never another exception, never a hang (a timer stops a load after HANG_SECONDS);
the sentence is short (under MAX_MESSAGE characters) and holds no character a terminal would act on.  A
Config that loads writes out (`resolved_yaml`) to text that loads back equal.  `tunesmith train` on a
config that fails exits 2 with the sentence and no traceback.
"""

from __future__ import annotations

import codecs
import os
import typing
from pathlib import Path

import pytest
import yaml
from conftest import time_limit
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tunesmith.cli import main
from tunesmith.config import Config, config_from_dict, load_config, resolved_yaml
from tunesmith.errors import UserError

HANG_SECONDS = 10
MAX_MESSAGE = 4000


def load_or_sentence(path: Path | None, overrides: list[str]) -> Config | str:
    """The Config, or the UserError's sentence after checking that it is one a person can read."""
    try:
        with time_limit(HANG_SECONDS):
            return load_config(path, overrides)
    except UserError as exc:
        message = str(exc)
        assert 0 < len(message) < MAX_MESSAGE, f"{len(message)} characters: {message[:300]!r}"
        bad = sorted({ch for ch in message if not ch.isprintable()})
        assert not bad, f"the sentence shows raw {bad!r}: {message[:300]!r}"
        return message


def assert_round_trips(cfg: Config, folder: Path) -> None:
    written = folder / "resolved.yaml"
    written.write_text(resolved_yaml(cfg), encoding="utf-8")
    with time_limit(HANG_SECONDS):
        assert load_config(written) == cfg


# --- strategies ----------------------------------------------------------------------------------------


def _sections() -> dict[str, type[BaseModel]]:
    out = {}
    for name, field in Config.model_fields.items():
        for kind in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out[name] = kind
    return out


SECTIONS = _sections()
REAL_KEYS = sorted({key for model in SECTIONS.values() for key in model.model_fields} | set(Config.model_fields))
DOTTED_KEYS = sorted([name for name in Config.model_fields if name not in SECTIONS]
                     + [f"{section}.{key}" for section, model in SECTIONS.items() for key in model.model_fields]
                     + ["student.prune.keep_layers"])

# Text YAML reads in a special way, and text that looks like what a field wants.
TRICKY = ["", "~", "null", "yes", "no", "on", "off", "y", "auto", "all-linear", "1e-4", "3e-4", ".5", "5E+3", "1.0e4",
          "0x1F", "017", "1_000", "1:30", "2024-01-01", ".nan", ".inf", "-.inf", "NaN", "3", "3.0", "-1", "0",
          "lora", "qlora", "cosine", "q_proj,v_proj", "rouge,bleu", "#### (.+)", "(unclosed", "a\x00b", "\t",
          "\x1b[31m",
          "\u202e", "é", "日本語", "!!python/object:os.system", "&a", "*a", "{a: 1}", "[1, 2]", "key: value"]

keys = st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=12), st.sampled_from(TRICKY), st.integers(-3, 3))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.integers(),
    st.integers(-(10**60), 10**60),  # past every bound and past 64 bits
    st.floats(),  # NaN and the infinities included
    st.floats(0, 2),
    st.text(max_size=20),
    st.sampled_from(TRICKY),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=10)


@st.composite
def raw_configs(draw):
    """A config mapping: mostly real sections with real keys, some random ones, any values; or not a mapping."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    out = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTIONS, *Config.model_fields]) | keys)
        model = SECTIONS.get(section) if isinstance(section, str) else None
        if model is None or draw(st.integers(0, 5)) == 0:
            out[section] = draw(values)
            continue
        section_keys = st.sampled_from(list(model.model_fields)) | keys
        out[section] = draw(st.dictionaries(section_keys, values, max_size=5))
    return out


@st.composite
def config_bytes(draw) -> bytes:
    """A config written as YAML (block or flow style), sometimes spoiled into bytes that are not YAML or not
    UTF-8; now and then plain random bytes."""
    if draw(st.integers(0, 14)) == 0:
        return draw(st.binary(max_size=200))
    text = yaml.safe_dump(draw(raw_configs()), allow_unicode=draw(st.booleans()),
                          default_flow_style=draw(st.sampled_from([False, True, None])), sort_keys=False)
    spoil = draw(st.sampled_from(["none"] * 6 + ["cut", "splice", "tabs", "utf-16", "latin-1", "bom", "repeat"]))
    if spoil == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif spoil == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(TRICKY) | st.text(max_size=6)) + text[at:]
    elif spoil == "tabs":
        text = text.replace("  ", "\t")
    elif spoil == "repeat":  # the same keys twice over
        text = text + text
    data = text.encode("utf-8")
    if spoil == "utf-16":
        data = text.encode("utf-16")  # with its byte-order mark
    elif spoil == "latin-1":
        data = text.encode("latin-1", "replace")
    elif spoil == "bom":
        data = codecs.BOM_UTF8 + data
    return data


def _flow(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, sort_keys=False)
    return text.strip().removesuffix("\n...")


set_keys = st.one_of(
    st.sampled_from(DOTTED_KEYS),
    st.lists(st.sampled_from(REAL_KEYS) | st.text(max_size=6), max_size=4).map(".".join),
    st.text(max_size=20),
)
set_values = st.one_of(values.map(_flow), st.text(max_size=30), st.sampled_from(TRICKY))
set_lines = st.one_of(st.builds(lambda k, v: f"{k}={v}", set_keys, set_values), st.text(max_size=20))


# --- the properties ------------------------------------------------------------------------------------


@settings(max_examples=350)
@given(data=config_bytes(), overrides=st.lists(set_lines, max_size=3))
def test_any_config_file_loads_or_says_what_is_wrong(data, overrides, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    out = load_or_sentence(path, overrides)
    event("loads" if isinstance(out, Config) else "refused")
    if isinstance(out, Config):
        assert_round_trips(out, tmp_path)
    else:
        assert str(path) in out or "--set" in out, out[:300]


@settings(max_examples=250)
@given(overrides=st.lists(set_lines, min_size=1, max_size=4))
def test_any_set_line_applies_or_says_what_is_wrong(overrides, tmp_path):
    out = load_or_sentence(None, overrides)
    event("loads" if isinstance(out, Config) else "refused")
    if isinstance(out, Config):
        assert_round_trips(out, tmp_path)


def _field_values(annotation) -> st.SearchStrategy:
    """Values of about the right type for a field, so that many configs are valid and round-trip."""
    kinds = [annotation, *typing.get_args(annotation)]
    options: list[st.SearchStrategy] = [st.none()] if type(None) in kinds else []
    for kind in kinds:
        if typing.get_origin(kind) is typing.Literal:
            options.append(st.sampled_from(typing.get_args(kind)))
        elif kind is bool:
            options.append(st.booleans())
        elif kind is int or typing.get_origin(kind) is typing.Annotated:
            options.append(st.integers(0, 4096))
        elif kind is float:
            options.append(st.floats(0, 1, allow_nan=False) | st.integers(1, 10))
        elif kind is str or str(kind).startswith("typing.Annotated[str"):
            options.append(st.text(min_size=1, max_size=12) | st.sampled_from(TRICKY))
        elif typing.get_origin(kind) in (list, dict):
            options.append(st.lists(st.sampled_from(["q_proj", "v_proj", "rouge", "bleu"]), min_size=1, max_size=3)
                           if typing.get_origin(kind) is list else
                           st.dictionaries(st.sampled_from(["prompt", "completion"]), st.text(min_size=1, max_size=8)))
    return st.one_of(options) if options else values


@st.composite
def typed_configs(draw):
    """Real sections and keys with values of about the right type (some out of range)."""
    out: dict = {}
    for section, model in draw(st.lists(st.sampled_from(sorted(SECTIONS.items(), key=lambda s: s[0])),
                                        max_size=4, unique=True)):
        fields = draw(st.lists(st.sampled_from(sorted(model.model_fields)), max_size=4, unique=True))
        out[section] = {name: draw(_field_values(model.model_fields[name].annotation)) for name in fields}
    return out


@settings(max_examples=200)
@given(raw=typed_configs())
def test_typed_configs_load_and_write_back_equal(raw, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    out = load_or_sentence(path, [])
    event("loads" if isinstance(out, Config) else "refused")
    if isinstance(out, Config):
        assert_round_trips(out, tmp_path)


# --- hand-made hostile files ---------------------------------------------------------------------------


def _bomb(levels: int = 9, width: int = 9) -> str:
    """Billion laughs: each level a list of `width` aliases to the level before: width**levels values."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    lines.append(f"training: {{epochs: *l{levels - 1}}}")  # a wrong value: the old message wrote it out whole
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int = 9) -> str:
    """The same with merge keys, which PyYAML copies into every mapping that merges them."""
    lines = ["m0: &m0 {a: 1, b: 2}"]
    lines += [f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}], k{i}: 1}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# (id, the file's bytes, or "folder"/"fifo"/"absent", and a piece the sentence must hold)
HOSTILE = [
    ("utf-16-no-bom", "training:\n  epochs: 2\n".encode("utf-16-le"), "U+0000"),
    ("latin-1", "data:\n  system_prompt: résumé\n".encode("latin-1"), "not UTF-8"),
    ("utf-16-bad", codecs.BOM_UTF16_LE + b"t\x00r\x00\x00\xd8", "UTF-16"),
    ("binary", bytes(range(256)), "run.yaml"),
    ("nul", b"training:\n  epochs: 1\x00\n", "U+0000"),
    ("escape-char", b"model:\n  name: a\x1bb\n", "U+001B"),
    ("list", b"- model\n- data\n", "the top level is a list"),
    ("scalar", b"quickstart\n", "the top level is the text 'quickstart'"),
    ("number", b"42\n", "the top level is the value 42"),
    ("two-documents", b"training: {epochs: 1}\n---\ntraining: {epochs: 2}\n", "one document"),
    ("bomb", _bomb().encode(), "10,000"),
    ("merge-bomb", _merge_bomb().encode(), "10,000"),
    ("self-alias", b"lora:\n  target_modules: &a [q_proj, *a]\n", "alias"),
    ("deep-flow", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "run.yaml, line 1"),
    ("deep-40", b"a: " + b"[" * 40 + b"]" * 40 + b"\n", "32 deep"),
    ("deep-block", "".join(" " * i + f"k{i}:\n" for i in range(600)).encode(), "32 deep"),
    ("many-keys", "".join(f"k{i}: {i}\n" for i in range(6000)).encode(), "10,000"),
    ("huge", b"data:\n  system_prompt: " + b"x" * (2 << 20) + b"\n", "KiB"),
    ("duplicate-key", b"training:\n  epochs: 1\n  batch_size: 4\n  epochs: 3\n", "`epochs` is given twice"),
    ("duplicate-section", b"training: {epochs: 1}\neval: {limit: 5}\ntraining: {epochs: 2}\n",
     "`training` is given twice"),
    ("tab", b"training:\n\tepochs: 1\n", "tabs"),
    ("python-tag", b"model:\n  name: !!python/object/apply:os.system [echo hi]\n", "!!python/object/apply:os.system"),
    ("local-tag", b"model:\n  name: !local value\n", "the tag !local is not allowed"),
    ("bad-int-tag", b"training:\n  batch_size: !!int 3.5\n", "cannot be read as !!int"),
    ("bad-bool-tag", b"training:\n  packing: !!bool maybe\n", "cannot be read as !!bool"),
    ("bad-timestamp-tag", b"training:\n  seed: !!timestamp soon\n", "cannot be read as !!timestamp"),
    ("5000-digits", b"training:\n  seed: " + b"9" * 5000 + b"\n", "4300 digits"),
    ("set-tag", b"eval:\n  metrics: !!set {rouge, bleu}\n", "eval.metrics"),
    ("bool-batch", b"training:\n  batch_size: true\n", "given True; allowed: a whole number"),
    ("quoted-epochs", b'training:\n  epochs: "3"\n', "without quotes"),
    ("float-batch", b"training:\n  batch_size: 1e15\n", "a whole number"),
    ("whole-float", b"training:\n  gradient_accumulation: 2.0\n", "a whole number"),
    ("zero-stage-float", b"distributed:\n  zero_stage: 3.0\n", "a whole number"),
    ("nan", b"training:\n  learning_rate: .nan\n", "a finite number"),
    ("inf", b"distributed:\n  timeout_s: .inf\n", "a finite number"),
    ("overflow-float", b"training:\n  learning_rate: 1e400\n", "a finite number"),
    ("batch-too-large", b"training:\n  batch_size: 100000000\n", "less than or equal to 1000000"),
    ("max-length-too-large", b"data:\n  max_length: 10000000\n", "data.max_length"),
    ("seed-negative", b"training:\n  seed: -1\n", "training.seed"),
    ("int64", b"training:\n  max_steps: 99999999999999999999\n", "9223372036854775807"),
    ("bad-regex", b"eval:\n  answer_regex: '#### (.+'\n", "missing ), unterminated subpattern"),
    ("huge-repeat-regex", b"eval:\n  answer_regex: 'a{99999999999}'\n", "eval.answer_regex"),
    ("nul-in-path", b'data:\n  path: "data\\0.jsonl"\n', "NUL"),
    ("empty-path", b'output:\n  dir: ""\n', "output.dir"),
    ("section-is-scalar", b"training: 3\n", "a mapping of keys to values"),
    ("unknown-keys", ("training:\n" + "".join(f"  k{i}: 1\n" for i in range(1000))).encode(), "995 more"),
    ("control-key", b'"\\e[31mred": 1\n', "\\x1b"),
    ("folder", "folder", "is a folder"),
    ("fifo", "fifo", "not a regular file"),
    ("absent", "absent", "no such config file"),
]


def _make(folder: Path, what) -> Path:
    path = folder / "run.yaml"
    if what == "folder":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)
    elif what != "absent":
        path.write_bytes(what)
    return path


@pytest.mark.parametrize("what, piece", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_a_hostile_config_file_is_a_sentence(what, piece, tmp_path):
    path = _make(tmp_path, what)
    out = load_or_sentence(path, [])
    assert isinstance(out, str), "loaded"
    assert out.startswith(str(path)) and piece in out, out[:500]
    # and `--set` on it ends the same way (apply_overrides is given whatever the file held)
    assert isinstance(load_or_sentence(path, ["method=lora"]), str)


HOSTILE_SETS = [
    (["=1"], "empty name"),
    (["a..b=1"], "empty name"),
    (["training.=1"], "empty name"),
    (["training"], "KEY=VALUE"),
    (["training=3"], "`training` is a section"),
    (["student.prune=[1]"], "`student.prune` is a section"),
    (["training.epochs.more=1"], "training.epochs"),
    (["lora.target_modules=[q_proj]", "lora.target_modules.0=v_proj"], "is a value, not a section"),
    (["trainïng.epochs=1"], "did you mean `training`"),
    (["training.épochs=1"], "did you mean `epochs`"),
    (["training.learning_rate=nan"], "training.learning_rate"),
    (["training.learning_rate=.nan"], "a finite number"),
    (['training.epochs="3"'], "without quotes"),
    (["training.batch_size=true"], "a whole number"),
    (["training.batch_size=2.0"], "a whole number"),
    (["data.columns={prompt: a, prompt: b}"], "`prompt` is given twice"),
    (["data.system_prompt=!!python/object:os.system x"], "is not allowed"),
    (["data.system_prompt=" + "x" * 300_000], "300,000 characters"),
    (["data.system_prompt=\udcff"], "not UTF-8"),
    (["data.path=a\x00b"], "NUL"),
    (["lora.target_modules=" + "[" * 40 + "]" * 40], "32 deep"),
    (["eval.answer_regex=(unclosed"], "eval.answer_regex"),
    (["x" * 100_000 + "=1"], "(100,000 characters in all)"),
    (["data.columns.int=1"], "data.columns.int"),  # a key of the user's that looks like pydantic's branch name
]


@pytest.mark.parametrize("overrides, piece", HOSTILE_SETS, ids=[str(i) for i in range(len(HOSTILE_SETS))])
def test_a_hostile_set_line_is_a_sentence(overrides, piece, tmp_path):
    out = load_or_sentence(None, overrides)
    assert isinstance(out, str), "loaded"
    assert piece in out, out[:500]


def test_many_problems_make_a_short_message():
    """An 800,000-key config once printed 133 MB of errors (and took minutes: each key looked itself up in the list
    of lines).  A YAML file that large is refused before validation (the many-keys case above); a mapping given
    to the library directly is validated, and the message names the first problems and counts the rest."""
    raw = {"model": {f"k{i}": i for i in range(20_000)}, "data": {"columns": {f"c{i}": i for i in range(5_000)}}}
    with pytest.raises(UserError) as err:
        config_from_dict(raw, "big.yaml")
    message = str(err.value)
    assert len(message) < MAX_MESSAGE
    assert "`model.k0`" in message and "19,995 more" in message  # a section's unknown keys: one sentence
    assert "config key `data.columns.c0`: given 0; allowed: text." in message
    assert message.endswith("And 4,991 more problems.")


# --- the command line ----------------------------------------------------------------------------------


def _train_exits_2(path: Path, overrides: list[str], capsys) -> str:
    argv = ["train", str(path)] + [arg for line in overrides for arg in ("--set", line)]
    with time_limit(HANG_SECONDS):
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-500:]
    assert err.startswith("tunesmith:") and "Traceback" not in err, err[-500:]
    return err


@pytest.mark.parametrize("what, piece", [case[1:] for case in HOSTILE[::4]], ids=[case[0] for case in HOSTILE[::4]])
def test_train_on_a_hostile_config_exits_2_with_the_sentence(what, piece, tmp_path, capsys):
    path = _make(tmp_path, what)
    assert piece in _train_exits_2(path, [], capsys)


@settings(max_examples=40)
@given(data=config_bytes(), overrides=st.lists(set_lines, max_size=2))
def test_train_on_a_failing_config_exits_2_with_the_sentence(data, overrides, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    # the last --set makes sure the config fails before any model loads: these runs must not start training
    _train_exits_2(path, [*overrides, "training.batch_size=0"], capsys)
