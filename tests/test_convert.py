"""`tunesmith convert`: axolotl and LLaMA-Factory configs (tests/convert_configs/, written in the shapes their docs
describe) become tunesmith configs that train, key by key, with every key that has no equivalent listed and none
dropped without a line.

The four configs under tests/convert_configs/ (QLoRA on a chat data set, LoRA on an alpaca data set with a
dataset_info.json, a full fine-tune, DPO) each train the built-in model for 5 steps (marked slow); everything else
converts without loading a model.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tunesmith import api
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.convert import convert_file, detect_tool, write_conversion
from tunesmith.convert.common import MESSAGE_ROLES, SHAREGPT_ROLES, Builder, optimizer, scheduler
from tunesmith.data.formats import CHAT_ROLES
from tunesmith.data.formats import SHAREGPT_ROLES as DATA_SHAREGPT_ROLES
from tunesmith.errors import UserError

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "convert_configs"
DATES = HERE.parent / "examples" / "data" / "dates-train.jsonl"
BUILTIN = "smollm2-135m-instruct"
# What the training tests change of a converted config: 5 steps of one row each, no before/after evaluation (the
# batch shape and the rest stay as converted; the mapping tests check them)
SHORT_RUN = ["training.max_steps=5", "eval.enabled=false", "training.batch_size=1", "training.gradient_accumulation=1"]


# --- data in the shapes the configs name, made from the example rows

def _rows(n: int = 32) -> list[dict]:
    with DATES.open() as handle:
        return [json.loads(line) for line, _ in zip(handle, range(n))]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _chat_rows() -> list[dict]:  # ShareGPT-style turns under `conversations` (axolotl chat_template, from/value)
    rows = []
    for i, r in enumerate(_rows()):
        turns = [{"from": "human", "value": f"{r['instruction']}\n\n{r['input']}"}, {"from": "gpt", "value": r["output"]}]
        if i % 4 == 0:
            turns.insert(0, {"from": "system", "value": "You answer with the date only."})
        rows.append({"conversations": turns})
    return rows


def _wrong(date: str) -> str:  # a plausible wrong answer: day and month swapped, US style
    year, month, day = date.split("-")
    return f"{day}/{month}/{year}"


def _setup(tmp_path: Path, fixture: str) -> Path:
    """The fixture config copied into tmp_path, with the data files it names beside it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / fixture
    shutil.copy(CONFIGS / fixture, source)
    rows = _rows()
    data = tmp_path / "data"
    if fixture == "axolotl_qlora_chat.yml":
        _write_jsonl(data / "chat.jsonl", _chat_rows())
    elif fixture == "axolotl_full_alpaca.yml":
        _write_jsonl(data / "alpaca.jsonl", rows)
    elif fixture == "axolotl_dpo.yml":
        _write_jsonl(data / "pairs.jsonl", [{"question": f"{r['instruction']}\n\n{r['input']}", "chosen": r["output"],
                                             "rejected": _wrong(r["output"])} for r in rows])
    elif fixture == "llamafactory_lora_alpaca.yaml":
        data.mkdir(parents=True, exist_ok=True)
        shutil.copy(CONFIGS / "llamafactory_dataset_info.json", data / "dataset_info.json")
        (data / "dates_alpaca.json").write_text(json.dumps(
            [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in rows]))
    return source


def _convert(tmp_path: Path, fixture: str, **kwargs):
    source = _setup(tmp_path, fixture)
    return convert_file(source, model=BUILTIN, **kwargs)


def _source_keys_accounted_for(conversion, raw: dict) -> None:
    """Every top-level key of the source that sets something is carried, listed as not carried, noted, or asks for
    what tunesmith does anyway."""
    def top(key: str) -> str:  # datasets[0].type, dataset: alpaca_demo, trl.beta -> the top-level key
        return key.split(":")[0].split(".")[0].split("[")[0]

    carried = {top(key) for key in [*conversion.carried.values(), *conversion.same]}
    listed = {top(key) for key, _ in conversion.not_carried + conversion.notes}
    for key, value in raw.items():
        if value is None or value is False:
            continue
        assert key in carried or key in listed, f"{key}: {value!r} was dropped without a line"


# --- the four configs train the built-in model

def _train_converted(tmp_path: Path, fixture: str) -> tuple[dict, object]:
    source = _setup(tmp_path, fixture)
    out = tmp_path / "tunesmith.yaml"
    conversion = api.convert_config(source, out, model=BUILTIN)
    cfg = api.load_config(out, SHORT_RUN)
    summary = api.train(cfg, tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished", status
    train = summary["train"]
    assert train["steps"] == 5, train
    assert math.isfinite(train["first_loss"]) and math.isfinite(train["final_loss"]), train
    return summary, conversion


@pytest.mark.slow
def test_axolotl_qlora_chat_config_trains_the_builtin_model(tmp_path):
    summary, conversion = _train_converted(tmp_path, "axolotl_qlora_chat.yml")
    assert conversion.config["method"] == "qlora"  # on a CPU without 4-bit kernels it falls back to LoRA
    assert conversion.config["data"]["format"] == "sharegpt"
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_llamafactory_lora_alpaca_config_trains_the_builtin_model(tmp_path):
    summary, conversion = _train_converted(tmp_path, "llamafactory_lora_alpaca.yaml")
    assert conversion.config["data"]["columns"] == {"instruction": "question", "input": "context", "output": "answer"}
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_axolotl_full_finetune_config_trains_the_builtin_model(tmp_path):
    summary, conversion = _train_converted(tmp_path, "axolotl_full_alpaca.yml")
    assert conversion.config["method"] == "full"
    assert not (tmp_path / "run" / "adapter").exists()  # every weight trained: a whole model, no adapter


@pytest.mark.slow
def test_axolotl_dpo_config_trains_the_builtin_model(tmp_path):
    summary, conversion = _train_converted(tmp_path, "axolotl_dpo.yml")
    assert conversion.config["objective"] == {"type": "dpo", "beta": 0.2}
    assert conversion.config["data"]["columns"] == {"prompt": "question"}


# --- key by key, no training

def test_axolotl_qlora_keys_map_one_by_one(tmp_path):
    conversion = _convert(tmp_path, "axolotl_qlora_chat.yml")
    c = conversion.config
    assert c["model"] == {"name": BUILTIN, "dtype": "auto"}
    assert c["method"] == "qlora"
    assert c["lora"] == {"r": 32, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}
    assert c["data"] == {"path": str(tmp_path / "data" / "chat.jsonl"), "format": "sharegpt", "max_length": 512,
                         "train_on_prompt": False, "validation_split": 0.1}
    t = c["training"]
    assert (t["batch_size"], t["gradient_accumulation"], t["epochs"]) == (2, 2, 1)
    assert (t["learning_rate"], t["lr_scheduler"], t["warmup_steps"], t["weight_decay"]) == (2e-4, "cosine", 10, 0.0)
    assert (t["optimizer"], t["packing"], t["gradient_checkpointing"]) == ("adamw", True, True)
    assert c["output"] == {"dir": "./outputs/qlora-out"}
    dropped = dict(conversion.not_carried)
    for key in ("flash_attention", "pad_to_sequence_len", "dataset_prepared_path", "logging_steps", "evals_per_epoch",
                "saves_per_epoch"):
        assert key in dropped, key
    notes = dict(conversion.notes)
    assert "paged_adamw_32bit" in notes["optimizer"] and "base_model" in notes
    _source_keys_accounted_for(conversion, yaml.safe_load((CONFIGS / "axolotl_qlora_chat.yml").read_text()))


def test_axolotl_full_and_dpo_keys_map_one_by_one(tmp_path):
    full = _convert(tmp_path / "full", "axolotl_full_alpaca.yml")
    assert full.config["method"] == "full" and "lora" not in full.config
    t = full.config["training"]
    assert (t["lr_scheduler"], t["optimizer"], t["adam_beta2"], t["seed"]) == ("cosine", "adamw", 0.95, 7)
    assert (t["eval_steps"], t["save_steps"], t["save_total_limit"], t["max_grad_norm"]) == (50, 100, 3, 1.0)
    assert full.config["data"]["seed"] == 7 and full.config["data"]["validation_split"] == 0.05
    assert {"deepspeed", "tf32", "special_tokens", "hub_model_id", "cosine_min_lr_ratio", "flash_attention",
            "gradient_checkpointing_kwargs"} <= {key for key, _ in full.not_carried}
    assert "cosine_with_min_lr" in dict(full.notes)["lr_scheduler"]
    _source_keys_accounted_for(full, yaml.safe_load((CONFIGS / "axolotl_full_alpaca.yml").read_text()))

    dpo = _convert(tmp_path / "dpo", "axolotl_dpo.yml")
    assert dpo.config["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert dpo.config["training"]["optimizer"] == "adamw_8bit" and dpo.config["training"]["lr_scheduler"] == "linear"
    assert dpo.config["data"]["validation_split"] == 0.0 and dpo.config["eval"] == {"enabled": False}
    assert "format" not in dpo.config["data"]  # preference rows: the columns tell the format
    _source_keys_accounted_for(dpo, yaml.safe_load((CONFIGS / "axolotl_dpo.yml").read_text()))


def test_llamafactory_lora_keys_map_one_by_one(tmp_path):
    conversion = _convert(tmp_path, "llamafactory_lora_alpaca.yaml")
    c = conversion.config
    assert c["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    assert c["data"]["path"] == str(tmp_path / "data" / "dates_alpaca.json")
    assert (c["data"]["max_length"], c["data"]["limit"], c["data"]["validation_split"]) == (1024, 1000, 0.1)
    t = c["training"]
    assert (t["batch_size"], t["gradient_accumulation"], t["epochs"], t["warmup_ratio"]) == (2, 2, 3.0, 0.1)
    assert (t["eval_batch_size"], t["eval_steps"], t["save_steps"]) == (1, 500, 500)
    assert c["distributed"]["timeout_s"] == 7 * 24 * 3600  # 180000000 s is past tunesmith's longest wait: a week
    assert "logging" not in c  # report_to: none
    dropped = {key for key, _ in conversion.not_carried}
    assert {"trust_remote_code", "overwrite_output_dir", "preprocessing_num_workers", "logging_steps"} <= dropped
    notes = dict(conversion.notes)
    assert "qwen" in notes["template"] and "2 x lora_rank" in notes["lora_alpha"]
    _source_keys_accounted_for(conversion, yaml.safe_load((CONFIGS / "llamafactory_lora_alpaca.yaml").read_text()))


def test_llamafactory_dpo_orpo_simpo_kto_and_sharegpt_formats(tmp_path):
    info = tmp_path / "data" / "dataset_info.json"
    info.parent.mkdir()
    shutil.copy(CONFIGS / "llamafactory_dataset_info.json", info)
    config = tmp_path / "pref.yaml"
    config.write_text("model_name_or_path: Qwen/Qwen3-0.6B\nstage: dpo\nfinetuning_type: lora\npref_loss: simpo\n"
                      "dataset: dates_pairs\npref_ftx: 0.5\n")
    simpo = convert_file(config)
    assert simpo.config["objective"] == {"type": "simpo", "beta": 0.1, "simpo_gamma": 0.5}  # LLaMA-Factory's defaults
    assert simpo.config["data"]["columns"] == {"prompt": "instruction"}
    assert "pref_ftx" in dict(simpo.not_carried)
    config.write_text("model_name_or_path: m\nstage: dpo\npref_loss: hinge\ndataset: dates_pairs\npref_beta: 0.3\n")
    hinge = convert_file(config)
    assert hinge.config["objective"] == {"type": "dpo", "beta": 0.3} and "hinge" in dict(hinge.notes)["pref_loss"]

    config.write_text("model_name_or_path: m\nstage: sft\ndataset: chat_openai,chat_sharegpt\nmix_strategy: "
                      "interleave_under\ninterleave_probs: 0.75,0.25\nfinetuning_type: full\n")
    mixed = convert_file(config)
    sources = mixed.config["data"]["sources"]
    assert [(s["format"], s.get("columns"), s["weight"]) for s in sources] == [
        ("messages", None, 0.75), ("sharegpt", None, 0.25)]
    assert sources[0]["path"] == str(tmp_path / "data" / "chat_openai.jsonl")
    assert "dataset_info.json: chat_sharegpt.columns.tools" in dict(mixed.not_carried)

    config.write_text("model_name_or_path: m\nstage: kto\ndataset: dates_pairs\n")
    with pytest.raises(UserError, match="ranking is true.*kto"):  # pairs are no labelled answers
        convert_file(config)
    (tmp_path / "kto").mkdir()
    (tmp_path / "kto" / "dataset_info.json").write_text(json.dumps({"kto_demo": {
        "file_name": "kto.json", "columns": {"prompt": "instruction", "response": "output", "kto_tag": "good"}}}))
    config.write_text("model_name_or_path: m\nstage: kto\ndataset: kto_demo\ndataset_dir: kto\n"
                      "kto_chosen_weight: 1.5\n")
    kto = convert_file(config)
    assert kto.config["objective"] == {"type": "kto", "kto_desirable_weight": 1.5}
    assert kto.config["data"]["columns"] == {"prompt": "instruction", "completion": "output", "label": "good"}


def test_several_axolotl_datasets_become_sources_and_hub_ids_stay(tmp_path):
    config = tmp_path / "mix.yml"
    config.write_text(yaml.safe_dump({
        "base_model": "org/model", "adapter": "lora", "lora_r": 8, "micro_batch_size": 1,
        "datasets": [{"path": "data/a.jsonl", "type": "alpaca"},
                     {"path": "tatsu-lab/alpaca", "type": "alpaca", "split": "train"},
                     {"path": "json", "data_files": ["data/c.jsonl"], "type": "completion", "field": "body"},
                     {"path": "data/d.jsonl", "type": "chat_template"}]}))
    conversion = convert_file(config)
    sources = conversion.config["data"]["sources"]
    assert [s["path"] for s in sources] == [str(tmp_path / "data" / "a.jsonl"), "tatsu-lab/alpaca",
                                            str(tmp_path / "data" / "c.jsonl"), str(tmp_path / "data" / "d.jsonl")]
    assert [s["format"] for s in sources] == ["alpaca", "alpaca", "text", "messages"]
    assert sources[2]["columns"] == {"text": "body"}
    assert all("weight" not in s and "rows" not in s for s in sources)  # joined, each row once, as axolotl does
    assert conversion.config["model"]["name"] == "org/model"  # a hub id, kept (tunesmith reads it where it can)


def test_data_and_model_replacements(tmp_path):
    config = _setup(tmp_path, "axolotl_full_alpaca.yml")
    mine = tmp_path / "elsewhere.jsonl"
    _write_jsonl(mine, _rows(8))
    conversion = convert_file(config, model="my-model", data=[str(mine)])
    assert conversion.config["data"]["path"] == str(mine) and conversion.config["data"]["format"] == "alpaca"
    assert conversion.config["model"]["name"] == "my-model"
    with pytest.raises(UserError, match="--data was given 2 times.*1 data set"):
        convert_file(config, data=[str(mine), str(mine)])


def test_trackers_map_to_logging_report_to(tmp_path):
    config = tmp_path / "t.yml"
    config.write_text("base_model: m\nadapter: lora\ndatasets: [{path: d.jsonl, type: alpaca}]\n"
                      "wandb_project: dates\nwandb_entity: me\nwandb_name: run-1\nuse_tensorboard: true\n"
                      "mlflow_tracking_uri: file:///tmp/mlruns\n")
    logging = convert_file(config).config["logging"]
    assert logging == {"report_to": ["wandb", "mlflow", "tensorboard"], "tracking_uri": "file:///tmp/mlruns",
                       "project": "dates", "run_name": "run-1"}
    config.write_text("model_name_or_path: m\ndataset: d.jsonl\nreport_to: wandb,tensorboard,swanlab\nrun_name: r\n"
                      "hf_hub_token: hf_SECRET\n")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    lf = convert_file(config)
    assert lf.config["logging"] == {"report_to": ["wandb", "tensorboard"], "run_name": "r"}
    dropped = dict(lf.not_carried)
    assert "swanlab" in dropped["report_to"]
    assert "hf_SECRET" not in dropped["hf_hub_token"] and "hf_SECRET" not in lf.yaml_text()


@pytest.mark.parametrize("name, ours, noted", [
    ("adamw_torch", "adamw", False), ("adamw_torch_fused", "adamw", False), ("adamw_bnb_8bit", "adamw_8bit", False),
    ("adamw_8bit", "adamw_8bit", False), ("paged_adamw_8bit", "paged_adamw_8bit", False),
    ("paged_adamw_32bit", "adamw", True), ("adafactor", "adamw", True), ("lion_8bit", "adamw", True)])
def test_optimizer_names(tmp_path, name, ours, noted):
    builder = Builder(tool="axolotl", raw={"optimizer": name}, source=tmp_path / "c.yml")
    optimizer(builder, "optimizer")
    assert builder.out["training"]["optimizer"] == ours
    assert bool(builder.notes) == noted


@pytest.mark.parametrize("name, ours, noted", [
    ("cosine", "cosine", False), ("linear", "linear", False), ("constant", "constant", False),
    ("constant_with_warmup", "constant", False), ("cosine_with_restarts", "cosine", True),
    ("polynomial", "linear", True), ("inverse_sqrt", "cosine", True)])
def test_scheduler_names(tmp_path, name, ours, noted):
    builder = Builder(tool="llamafactory", raw={"lr_scheduler_type": name}, source=tmp_path / "c.yml")
    scheduler(builder, "lr_scheduler_type")
    assert builder.out["training"]["lr_scheduler"] == ours
    assert bool(builder.notes) == noted


def test_every_unknown_key_is_listed(tmp_path):
    raw = yaml.safe_load((CONFIGS / "axolotl_qlora_chat.yml").read_text())
    made_up = {"frobnicate_layers": 3, "use_quantum_attention": True, "learnin_rate": 0.1, "zzz": {"a": 1},
               "turbo_mode": False, "empty_made_up_key": None}
    raw.update(made_up)
    raw["datasets"][0]["sparkle_factor"] = 0.5
    raw["datasets"][0]["message_property_mappings"]["mood"] = "tone"
    config = tmp_path / "made_up.yml"
    config.write_text(yaml.safe_dump(raw))
    conversion = convert_file(config)
    listed = dict(conversion.not_carried)
    for key in made_up:
        assert key in listed, f"{key} was dropped without a line"
    assert "not an axolotl key" in listed["zzz"] and "did you mean learning_rate?" in listed["learnin_rate"]
    assert "datasets[0].sparkle_factor" in listed
    assert "datasets[0].message_property_mappings.mood" in listed
    assert len(listed) == len(conversion.not_carried)  # each key once
    text = conversion.yaml_text()
    for key in [*made_up, "datasets[0].sparkle_factor"]:
        assert key in text  # the header of the written config lists it too

    lf = tmp_path / "lf.yaml"
    lf.write_text("model_name_or_path: m\ndataset: d.jsonl\nmade_up_lf_key: 1\nlora_rnak: 4\n")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert {"made_up_lf_key", "lora_rnak"} <= {key for key, _ in convert_file(lf).not_carried}


def test_the_written_config_loads_and_lists_what_was_not_carried(tmp_path):
    conversion = _convert(tmp_path, "axolotl_full_alpaca.yml")
    out = write_conversion(conversion, tmp_path / "out" / "tunesmith.yaml")
    text = out.read_text()
    assert text.startswith("# Converted by `tunesmith convert` from the axolotl config")
    assert "deepspeed: 'deepspeed_configs/zero3_bf16.json'" in text
    cfg = load_config(out)
    assert cfg.method == "full" and cfg.training.learning_rate == 1e-5 and cfg.training.adam_beta2 == 0.95
    assert cfg.data.path == str(tmp_path / "data" / "alpaca.jsonl")
    assert cfg.training.epochs == 2 and cfg.training.warmup_ratio == 0.1


def test_outputs_are_never_written_over(tmp_path):
    source = _setup(tmp_path, "axolotl_dpo.yml")
    before = source.read_bytes()
    conversion = convert_file(source)
    with pytest.raises(UserError, match="is the config being converted"):
        write_conversion(conversion, source, force=True)
    assert source.read_bytes() == before
    out = tmp_path / "out.yaml"
    out.write_text("keep me\n")
    with pytest.raises(UserError, match="already exists.*--force"):
        write_conversion(conversion, out)
    assert out.read_text() == "keep me\n"
    write_conversion(conversion, out, force=True)
    assert load_config(out).objective.type == "dpo"


@pytest.mark.parametrize("text, match", [
    ("base_model: [unclosed\n", "not valid YAML"),
    ("- just\n- a list\n", "a list, not a mapping"),
    ("", "is empty"),
    ("foo: 1\nbar: 2\n", "cannot tell whether axolotl or LLaMA-Factory"),
    ("model: {name: x}\ntraining: {epochs: 1}\n", "a tunesmith config already"),
    ("base_model: m\ndatasets: [{path: d.jsonl, type: input_output}]\n", r"datasets\[0\]\.type is input_output"),
    ("base_model: m\ndatasets: [{path: d.jsonl, type: pygmalion}]\n", r"datasets\[0\]\.type is 'pygmalion'"),
    ("base_model: m\nrl: dpo\ndatasets: [{path: d.jsonl, type: chatml.ultra}]\n", r"datasets\[0\]\.type"),
    ("base_model: m\nrl: grpo\ndatasets: [{path: d.jsonl, type: alpaca}]\n", "rl: grpo"),
    ("base_model: m\nadapter: ia3\ndatasets: [{path: d.jsonl, type: alpaca}]\n", "adapter: 'ia3'"),
    ("base_model: m\ndatasets: [{path: d.jsonl, type: chat_template, message_property_mappings: "
     "{role: speaker, content: text}}]\n", "message_property_mappings"),
    ("base_model: m\nlearning_rate: fast\ndatasets: [{path: d.jsonl, type: alpaca}]\n", "`learning_rate` is 'fast'"),
    ("base_model: m\nlora_dropout: 1.5\nadapter: lora\ndatasets: [{path: d.jsonl, type: alpaca}]\n",
     "lora.dropout comes from lora_dropout"),
    ("model_name_or_path: m\nstage: ppo\ndataset: x\n", "stage: ppo"),
    ("model_name_or_path: m\nstage: sft\ndataset: not_described\n", "dataset_info.json"),
    ("model_name_or_path: m\ndo_train: false\ndataset: x\n", "do_train is false"),
])
def test_bad_input_is_a_sentence_naming_the_key(tmp_path, text, match):
    config = tmp_path / "bad.yml"
    config.write_text(text)
    with pytest.raises(UserError, match=match):
        convert_file(config)


def test_from_overrides_detection(tmp_path):
    assert detect_tool({"base_model": "m", "datasets": []}) == "axolotl"
    assert detect_tool({"model_name_or_path": "m", "stage": "sft", "dataset": "x"}) == "llamafactory"
    config = tmp_path / "c.yml"
    config.write_text("output_dir: out\nlearning_rate: 1.0e-4\nmodel_name_or_path: m\ndataset: d.jsonl\n")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert convert_file(config, tool="llamafactory").tool == "llamafactory"
    with pytest.raises(UserError, match="--from torchtune"):
        convert_file(config, tool="torchtune")


def test_convert_command_prints_the_list(tmp_path, capsys):
    source = _setup(tmp_path, "axolotl_qlora_chat.yml")
    out = tmp_path / "converted.yaml"
    assert main(["convert", str(source), "--out", str(out), "--model", BUILTIN]) == 0
    printed = capsys.readouterr().out
    assert "not carried over (6):" in printed and "flash_attention: true" in printed
    assert f"tunesmith train {out}" in printed
    assert load_config(out).method == "qlora"
    assert main(["convert", str(source), "--out", str(out)]) == 2  # exists, no --force
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.yml"), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_role_names_agree_with_the_data_readers():
    assert MESSAGE_ROLES == CHAT_ROLES
    assert set(SHAREGPT_ROLES) == set(DATA_SHAREGPT_ROLES)


def test_dataset_info_beside_the_config_and_hub_data_sets(tmp_path):
    shutil.copy(CONFIGS / "llamafactory_dataset_info.json", tmp_path / "dataset_info.json")
    config = tmp_path / "hub.yaml"
    config.write_text("model_name_or_path: m\nstage: sft\ndataset: hub_alpaca\nval_size: 0.2\n")
    conversion = convert_file(config)  # no data/ folder: the dataset_info.json beside the config is read
    assert conversion.config["data"]["path"] == "someone/alpaca-demo" and conversion.config["data"]["format"] == "alpaca"
    assert "dataset_dir" not in dict(conversion.not_carried)
    config.write_text("model_name_or_path: m\nstage: sft\ndataset: chat_openai\ndataset_dir: nowhere\n")
    assert convert_file(config).config["data"]["format"] == "messages"


def test_convert_help():
    with pytest.raises(SystemExit) as done:
        main(["convert", "--help"])
    assert done.value.code == 0
