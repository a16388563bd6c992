"""The config: defaults, overrides, errors that name the key, and a resolved config that round-trips."""

import pytest
import yaml

from tunesmith.config import Config, load_config, resolved_yaml
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
