"""The config: defaults, overrides, errors that name the key, and a resolved config that round-trips."""

import re
import typing

import pytest
import yaml

from tunesmith.config import Config, config_from_dict, load_config, resolved_yaml
from tunesmith.errors import UserError


def test_defaults_follow_the_spec():
    cfg = load_config(None)
    t = cfg.training
    assert (t.batch_size, t.eval_batch_size, t.gradient_accumulation) == (2, 1, 1)
    assert (t.learning_rate, t.lr_scheduler, t.epochs, t.optimizer) == (1e-4, "cosine", 3, "adamw")
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.model.trust_remote_code is False
    assert cfg.data.train_on_prompt is False


def test_set_overrides_dotted_keys_with_typed_values(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  epochs: 2\nlora:\n  r: 8\n")
    cfg = load_config(path, ["training.learning_rate=3e-4", "training.max_steps=5", "lora.target_modules=[q_proj, v_proj]",
                             "data.train_on_prompt=true"])
    assert cfg.training.learning_rate == pytest.approx(3e-4)
    assert cfg.training.max_steps == 5
    assert cfg.training.epochs == 2  # from the file
    assert cfg.lora.r == 8
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train_on_prompt is True


@pytest.mark.parametrize(
    "override, names",
    [
        ("training.learning_rat=1e-4", ["training.learning_rat", "learning_rate"]),
        ("training.epochs=many", ["training.epochs", "'many'", "a number"]),
        ("method=qlorax", ["method", "'qlorax'", "'lora'", "'full'"]),
        ("data.validation_split=1.5", ["data.validation_split", "1.5"]),
        ("training.batch_size=0", ["training.batch_size", "0"]),
        ("colour=blue", ["colour", "training"]),
    ],
)
def test_a_bad_key_or_value_names_the_key_the_value_and_what_is_allowed(override, names):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    for name in names:
        assert name in str(err.value)


def test_an_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  batch_size: two\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*training\.batch_size.*'two'"):
        load_config(path)


def test_broken_yaml_and_missing_file_are_sentences(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("training: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_resolved_config_writes_every_default_and_round_trips(tmp_path):
    cfg = load_config(None, ["training.learning_rate=2e-4", "data.columns={prompt: dialogue, completion: summary}"])
    text = resolved_yaml(cfg)
    raw = yaml.safe_load(text)
    # every key of every section is written out, defaults included
    for section, model in Config.model_fields.items():
        if hasattr(model.annotation, "model_fields"):
            assert set(raw[section]) == set(model.annotation.model_fields), section
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg
    assert resolved_yaml(again) == text


# --- strict values: a number is written as a number, and the YAML reader agrees with --set on what one is


@pytest.mark.parametrize("text", ["1e-4", "3e-4", "5E-3", "1.0e-4", ".5", "+.5", "2.5", "1e2"])
def test_an_unquoted_number_is_a_number_in_a_file_and_in_set(text, tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as text; the config reader takes YAML 1.2's floats, like --set always did."""
    path = tmp_path / "run.yaml"
    path.write_text(f"training:\n  learning_rate: {text}\n")
    assert load_config(path).training.learning_rate == float(text)
    assert load_config(None, [f"training.learning_rate={text}"]).training.learning_rate == float(text)


def _leaf_fields():
    """(dotted key, annotation) of every value in the schema, and the mapping that sets it."""
    out = []
    for section, field in Config.model_fields.items():
        model = field.annotation
        if not hasattr(model, "model_fields"):
            out.append((section, field.annotation))
            continue
        for name, leaf in model.model_fields.items():
            out.append((f"{section}.{name}", leaf.annotation))
    out.append(("student.prune.keep_layers", int))
    return out


def _raw(key: str, value) -> dict:
    raw: dict = {}
    node = raw
    *sections, last = key.split(".")
    for part in sections:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def _kinds(annotation) -> set:
    return {a for a in (annotation, *typing.get_args(annotation)) if a in (int, float)} | (
        {int} if any(typing.get_origin(a) is typing.Annotated and typing.get_args(a)[0] is int
                     for a in typing.get_args(annotation)) else set())


NUMBER_FIELDS = [(key, _kinds(ann)) for key, ann in _leaf_fields() if _kinds(ann)]


@pytest.mark.parametrize("key, kinds", NUMBER_FIELDS, ids=[key for key, _ in NUMBER_FIELDS])
def test_a_number_field_refuses_booleans_quoted_numbers_and_nan(key, kinds):
    wrong = [True, False, "8", ".nan", float("nan"), float("inf"), [8]]
    if int in kinds and float not in kinds:
        wrong += [8.0, 1e15]  # a whole-number field takes no float, not even a whole one
    for value in wrong:
        with pytest.raises(UserError, match=re.escape(f"config key `{key}`")):
            config_from_dict(_raw(key, value))


def test_a_whole_number_field_says_so_and_a_quoted_number_says_to_unquote():
    with pytest.raises(UserError, match=r"`training.batch_size`: given 2.0; allowed: a whole number\."):
        config_from_dict({"training": {"batch_size": 2.0}})
    with pytest.raises(UserError, match=r"`training.epochs`: given '3'; allowed: a number; write the number without"):
        config_from_dict({"training": {"epochs": "3"}})
    assert config_from_dict({"training": {"epochs": 3}}).training.epochs == 3.0  # a whole number is a number


@pytest.mark.parametrize(
    "key, top, beyond",
    [
        ("training.batch_size", 1_000_000, 1_000_001),
        ("training.eval_batch_size", 1_000_000, 1_000_001),
        ("training.gradient_accumulation", 1_000_000, 1_000_001),
        ("eval.batch_size", 1_000_000, 1_000_001),
        ("data.max_length", 1_048_576, 1_048_577),
        ("eval.max_new_tokens", 1_048_576, 1_048_577),
        ("training.seed", 2**32 - 1, 2**32),
        ("data.seed", 2**32 - 1, 2**32),
        ("training.max_steps", 2**63 - 1, 2**63),
        ("training.epochs", 1_000_000, 1_000_001),
        ("training.num_threads", 1024, 1025),
        ("distributed.timeout_s", 604_800, 604_801),
    ],
)
def test_values_that_can_only_be_mistakes_are_refused(key, top, beyond):
    config_from_dict(_raw(key, top))
    with pytest.raises(UserError, match=re.escape(f"config key `{key}`: given {beyond}; allowed: less than or equal")):
        config_from_dict(_raw(key, beyond))


def test_seeds_are_not_negative():
    with pytest.raises(UserError, match="`training.seed`: given -1"):
        load_config(None, ["training.seed=-1"])


def test_answer_regex_is_compiled_when_the_config_loads():
    # (YAML reads `#### (.+)` as a comment, so null; --set takes a value that would lose a comment as its text)
    assert load_config(None, ["eval.answer_regex=#### (.+)"]).eval.answer_regex == "#### (.+)"
    assert load_config(None, ["data.system_prompt=Use # for titles"]).data.system_prompt == "Use # for titles"
    assert load_config(None, ["eval.answer_regex=\\d+"]).eval.answer_regex == "\\d+"  # no group: the whole match
    with pytest.raises(UserError, match=r"`eval.answer_regex`: given '#### \(\.\+'; allowed: a regular expression .*"
                                        r"missing \), unterminated subpattern at position 5"):
        load_config(None, ["eval.answer_regex=#### (.+"])


PATH_KEYS = ["model.name", "data.path", "data.validation_path", "data.test_path", "teacher.name", "student.name",
             "distill.cache_dir", "output.dir"]


@pytest.mark.parametrize("key", PATH_KEYS)
def test_a_path_with_a_nul_character_or_no_text_is_refused(key):
    with pytest.raises(UserError, match=re.escape(f"config key `{key}`: given 'a\\x00b'; allowed: a path without NUL")):
        config_from_dict(_raw(key, "a\x00b"))
    with pytest.raises(UserError, match=re.escape(f"config key `{key}`: given ''; allowed: a path; empty text")):
        config_from_dict(_raw(key, ""))


def test_zero_stage_takes_whole_numbers_only():
    assert load_config(None, ["distributed.zero_stage=3"]).distributed.zero_stage == 3
    with pytest.raises(UserError, match="`distributed.zero_stage`: given 3.0"):
        load_config(None, ["distributed.zero_stage=3.0"])


def test_text_that_looks_like_a_number_round_trips_quoted(tmp_path):
    """resolved_yaml quotes text the reader would take for a float ('1e5'), so the run folder's config reads back."""
    cfg = load_config(None, ['data.system_prompt="1e5"', 'data.columns={prompt: "3e-4", completion: ".5"}'])
    assert cfg.data.system_prompt == "1e5" and cfg.data.columns == {"prompt": "3e-4", "completion": ".5"}
    path = tmp_path / "config.yaml"
    path.write_text(resolved_yaml(cfg))
    assert load_config(path) == cfg


def test_set_reads_values_as_a_config_file_does(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  epochs: 2\n  max_steps: null\n  fast_kernels: off\n  packing: yes\n"
                    "data:\n  columns: {prompt: dialogue}\n")
    from_set = load_config(None, ["training.epochs=2", "training.max_steps=null", "training.fast_kernels=off",
                                  "training.packing=yes", "data.columns.prompt=dialogue"])
    assert load_config(path) == from_set
    assert (from_set.training.fast_kernels, from_set.training.packing) == ("off", True)


def test_a_name_or_a_path_alone_stands_for_its_section():
    """`model: NAME`, `data: FILE` and `objective: dpo` are the sections they name; --set takes the same, and a key
    set beside a short form in the file keeps both."""
    from tunesmith.config import load_config_text

    cfg = load_config_text("model: smollm2-135m-instruct\ndata: rows.jsonl\nobjective: dpo\n")
    assert (cfg.model.name, cfg.data.path, cfg.objective.type) == ("smollm2-135m-instruct", "rows.jsonl", "dpo")
    cfg = load_config_text("model: m1\ndata: a.jsonl\n", ["model.dtype=float32", "data.max_length=64", "objective=kto"])
    assert (cfg.model.name, cfg.model.dtype, cfg.data.path, cfg.data.max_length) == ("m1", "float32", "a.jsonl", 64)
    cfg = load_config_text("model: {name: m1, dtype: float32}\n", ["model=m2", "data=b.jsonl"])
    assert (cfg.model.name, cfg.model.dtype, cfg.data.path) == ("m2", "float32", "b.jsonl")
    assert cfg.data.validation_split == 0.1  # the rest of the section keeps its defaults
