"""Several data sets in one run (data.sources): the short forms, the mix by weight and row count, the readers
(save_to_disk folders, Parquet shards, Arrow files, hub ids), the per-source cache, the tokenising pool, and
a sentence for each bad source."""

import json
import math
import time

import pytest
from conftest import build_tiny_llama_config, build_tiny_tokenizer, save_tiny_model_folder, write_rows

from tunesmith import api
from tunesmith.config import load_config, load_config_text, resolved_yaml
from tunesmith.data import build_datasets, inspect_file
from tunesmith.data.build import load_source
from tunesmith.data.preference import build_preference_data
from tunesmith.data.sources import mix
from tunesmith.errors import UserError


def qa_rows(n: int, topic: str) -> list[dict]:
    return [{"prompt": f"{topic} question number {i}?", "completion": f"{topic} answer {i}."} for i in range(n)]


def alpaca_rows(n: int, topic: str) -> list[dict]:
    return [{"instruction": f"{topic} task {i}.", "input": "", "output": f"{topic} done {i}."} for i in range(n)]


def data_config(text: str):
    return load_config_text(text).data


def source_of(sample: dict) -> str:
    """Which test source a sample came from, by the words the rows above put in it."""
    return sample["messages"][-1]["content"].split()[0]


# --- the config ---------------------------------------------------------------------------------------------


def test_short_forms_and_the_check_that_path_and_sources_are_not_both_given():
    assert load_config_text("data: file.jsonl\n").data.path == "file.jsonl"
    cfg = load_config_text("data: [a.jsonl, {path: b.parquet, weight: 3}]\n")
    assert cfg.data.path is None
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("a.jsonl", None), ("b.parquet", 3.0)]
    assert load_config_text(resolved_yaml(cfg)) == cfg  # every key written out still reads back the same
    # --set takes the same forms: a list replaces data.path, a path replaces data.sources, other keys stay
    cfg = load_config_text("data: {path: a.jsonl, max_length: 64}\n", ["data=[b.jsonl, c.jsonl]"])
    assert (cfg.data.path, [s.path for s in cfg.data.sources], cfg.data.max_length) == (None, ["b.jsonl", "c.jsonl"], 64)
    cfg = load_config_text("data: [b.jsonl]\n", ["data=a.jsonl", "data.seed=7"])
    assert (cfg.data.path, cfg.data.sources, cfg.data.seed) == ("a.jsonl", [], 7)
    assert load_config_text("data: [b.jsonl]\n", ["data.max_length=64"]).data.max_length == 64

    with pytest.raises(UserError, match=r"`data`.*data\.path or data\.sources, not both.*remove data\.path"):
        load_config_text("data: {path: a.jsonl, sources: [b.jsonl]}\n")
    with pytest.raises(UserError, match=r"data\.path or data\.sources, not both"):
        load_config_text("data: a.jsonl\n", ["data.sources=[b.jsonl]"])
    with pytest.raises(UserError, match=r"data\.sources\.0.*a weight or a row count, not both"):
        load_config_text("data: [{path: a.jsonl, weight: 2, rows: 10}]\n")
    with pytest.raises(UserError, match=r"a training data file in data\.path"):
        load_config_text("data: {path: null}\n")


# --- mixing -------------------------------------------------------------------------------------------------


def test_weights_3_to_1_give_that_ratio_and_the_stats_and_the_log_say_so(tiny_tokenizer, tmp_path, log_lines):
    a = write_rows(tmp_path / "a.jsonl", qa_rows(120, "alpha"))
    b = write_rows(tmp_path / "b.jsonl", qa_rows(120, "beta"))
    cfg = data_config(f"data: {{sources: [{{path: {a}, weight: 3}}, {{path: {b}}}], validation_split: 0.2}}\n")
    bundle = build_datasets(cfg, tiny_tokenizer)

    counts = {"alpha": 0, "beta": 0}
    for sample in bundle.train_samples + bundle.validation_samples:
        counts[source_of(sample)] += 1
    assert counts == {"alpha": 120, "beta": 40}  # a runs out first: 120 + 120 / 3
    held = {"alpha": 0, "beta": 0}
    for sample in bundle.validation_samples:
        held[source_of(sample)] += 1
    assert held == {"alpha": 24, "beta": 8}  # 20% of 160, in proportion
    sources = bundle.stats["sources"]
    assert [(s["path"], s["rows_available"], s["rows_used"], s["weight"]) for s in sources] == [
        (str(a), 120, 120, 3.0), (str(b), 120, 40, 1.0)]
    assert [(s["train"], s["validation"]) for s in sources] == [(96, 24), (32, 8)]
    assert (bundle.stats["train"], bundle.stats["validation"], bundle.stats["rows_used"]) == (128, 32, 160)
    assert f"data: 120 rows from {a} (weight 3), 40 from {b} (weight 1, of 120)" in log_lines
    # the two splits share no row, and the training rows of both sources are interleaved
    assert not {json.dumps(s) for s in bundle.train_samples} & {json.dumps(s) for s in bundle.validation_samples}
    assert {source_of(s) for s in bundle.train_samples[:20]} == {"alpha", "beta"}


def test_rows_gives_exactly_that_many_repeating_only_training_rows(tiny_tokenizer, tmp_path, log_lines):
    a = write_rows(tmp_path / "a.jsonl", qa_rows(100, "alpha"))
    b = write_rows(tmp_path / "b.csv", qa_rows(30, "beta"))
    cfg = data_config(f"data: {{sources: [{{path: {a}, rows: 50}}, {{path: {b}, rows: 75}}], validation_split: 0.2}}\n")
    bundle = build_datasets(cfg, tiny_tokenizer)
    sources = bundle.stats["sources"]
    assert [s["rows_used"] for s in sources] == [50, 75]
    assert [s["train"] + s["validation"] for s in sources] == [50, 75]
    assert [s["repeated"] for s in sources] == [False, True]
    everything = bundle.train_samples + bundle.validation_samples
    assert sum(source_of(s) == "beta" for s in everything) == 75
    # b's 30 rows: each trains 2 or 3 times, and a row held out for validation is never trained on
    beta_train = [json.dumps(s) for s in bundle.train_samples if source_of(s) == "beta"]
    assert {beta_train.count(row) for row in set(beta_train)} <= {2, 3}
    assert not set(beta_train) & {json.dumps(s) for s in bundle.validation_samples}
    assert f"data: 50 rows from {a} (rows: 50, of 100), 75 from {b} (rows: 75, its 30 rows repeated)" in log_lines


def test_the_same_seed_gives_the_same_mix_and_another_seed_another(tiny_tokenizer, tmp_path):
    a = write_rows(tmp_path / "a.jsonl", qa_rows(60, "alpha"))
    b = write_rows(tmp_path / "b.jsonl", qa_rows(60, "beta"))

    def built(seed: int):
        cfg = data_config(f"data: {{sources: [{{path: {a}, weight: 2}}, {{path: {b}}}], seed: {seed}}}\n")
        return build_datasets(cfg, tiny_tokenizer)

    first, again, other = built(1), built(1), built(2)
    assert first.train_samples == again.train_samples and first.validation_samples == again.validation_samples
    assert [r.input_ids for r in first.train] == [r.input_ids for r in again.train]
    assert first.train_samples != other.train_samples  # another choice and order
    assert [s["rows_used"] for s in other.stats["sources"]] == [60, 30]  # the same shares


def test_the_mix_rule_on_its_own():
    cfg = load_config_text("data: [{path: a, weight: 1}, {path: b, weight: 1}, {path: c, rows: 7}]\n").data
    mixed = mix([10, 4, 3], cfg.sources, seed=0, validation_split=0.0)
    assert mixed.drawn == [4, 4, 7]  # b runs out first; c repeats its 3 rows
    copies = [j for i, j in mixed.train if i == 2]
    assert sorted(copies.count(j) for j in range(3)) == [2, 2, 3]  # two whole passes, then part of one


# --- reading sources ---------------------------------------------------------------------------------------


def test_a_save_to_disk_folder_and_a_jsonl_file_train_the_tiny_model(tmp_path):
    datasets = pytest.importorskip("datasets")
    model_dir, _ = save_tiny_model_folder(tmp_path, [])
    saved = tmp_path / "saved"
    words = ["river", "stone", "cloud", "apple", "green", "music", "paper", "light"]
    datasets.Dataset.from_list([{"q": f"Repeat the word {w}.", "a": f"{w} {w} {w}"} for w in words]).save_to_disk(
        str(saved))
    jsonl = write_rows(tmp_path / "more.jsonl", [{"instruction": f"Say {w} twice.", "output": f"{w} {w}"}
                                                 for w in words[:4]])
    cfg = load_config_text(
        f"model: {model_dir}\n"
        f"data: {{sources: [{{path: {saved}, columns: {{prompt: q, completion: a}}, weight: 1}}, {{path: {jsonl}}}], "
        "validation_split: 0.25}\n"
        "training: {max_steps: 4, batch_size: 2, learning_rate: 1.0e-2, lr_scheduler: constant}\n"
        "lora: {dropout: 0.0}\neval: {enabled: false}\n")
    summary = api.train(cfg, tmp_path / "run")

    saved_summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    sources = saved_summary["data"]["sources"]
    assert [(s["path"], s["format"], s["rows_used"]) for s in sources] == [
        (str(saved), "prompt_completion", 4), (str(jsonl), "alpaca", 4)]  # 1:1, the jsonl file runs out first
    assert saved_summary["data"]["train"] + saved_summary["data"]["validation"] == 8
    train = summary["train"]
    assert train["steps"] == 4 and math.isfinite(train["final_loss"])
    assert train["final_loss"] < train["first_loss"], train

    # a sentence about the rows names the sources, not the data.path the config left empty
    too_big = cfg.model_copy(update={"training": cfg.training.model_copy(update={"batch_size": 64})})
    with pytest.raises(UserError, match=r"but data\.sources \(.*saved, .*more\.jsonl\) gives 6 training rows"):
        api.train(too_big, tmp_path / "run-too-big")
    assert not (tmp_path / "run-too-big").exists()


def test_parquet_shards_arrow_files_and_a_dataset_dict_split_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(qa_rows(3, "first")), shards / "part-000.parquet")
    pq.write_table(pa.Table.from_pylist(qa_rows(2, "second")), shards / "part-001.parquet")
    table = pa.Table.from_pylist(alpaca_rows(4, "arrow"))
    with pa.ipc.new_file(str(tmp_path / "rows.arrow"), table.schema) as writer:  # the random-access layout
        writer.write_table(table)
    with pa.ipc.new_stream(str(tmp_path / "stream.arrow"), table.schema) as writer:  # the stream layout
        writer.write_table(table)
    cfg = data_config(f"data: [{shards}, {tmp_path / 'rows.arrow'}, {tmp_path / 'stream.arrow'}]\n")
    parts = [load_source(i, s, cfg, None) for i, s in enumerate(cfg.sources)]
    assert [p.samples[0]["messages"][-1]["content"] for p in parts] == ["first answer 0.", "arrow done 0.",
                                                                        "arrow done 0."]
    assert [len(p.samples) for p in parts] == [5, 4, 4]
    assert parts[0].places[3] == f"{shards / 'part-001.parquet'}, row 1"  # a shard's row is named by its own file

    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(qa_rows(3, "train")),
                          "test": datasets.Dataset.from_list(qa_rows(2, "test"))}).save_to_disk(str(folder))
    cfg = data_config(f"data: [{{path: {folder}, split: test}}]\n")
    part = load_source(0, cfg.sources[0], cfg, None)
    assert [s["messages"][-1]["content"] for s in part.samples] == ["test answer 0.", "test answer 1."]
    with pytest.raises(UserError, match=r"data\.sources\[0\]\.path: .*dict holds the splits train, test, not 'dev'"):
        load_source(0, data_config(f"data: [{{path: {folder}, split: dev}}]\n").sources[0], cfg, None)


def test_inspect_reads_a_source_with_its_own_settings(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([{"q": "Hi?", "a": "Hello."}, {"q": "Bye?", "a": ""}]).save_to_disk(str(folder))
    cfg = data_config(f"data: [{{path: {folder}, columns: {{prompt: q, completion: a}}}}]\n")
    report = inspect_file(folder, None, cfg)
    assert (report["source"], report["format"], report["rows"], report["empty_answers"]) == (
        "data.sources[0]", "prompt_completion", 2, 1)
    assert "(read as data.sources[0])" in api.format_inspection(report)


# --- the cache and the pool ----------------------------------------------------------------------------------


def test_a_new_weight_or_one_more_source_retokenises_only_what_is_new(tiny_tokenizer, tmp_path, monkeypatch):
    import tunesmith.data.build as build

    a = write_rows(tmp_path / "a.jsonl", qa_rows(30, "alpha"))
    b = write_rows(tmp_path / "b.jsonl", qa_rows(20, "beta"))
    c = write_rows(tmp_path / "c.jsonl", qa_rows(7, "gamma"))
    cache = tmp_path / "cache"
    first = build_datasets(data_config(f"data: [{{path: {a}, weight: 3}}, {b}]\n"), tiny_tokenizer, cache_dir=cache)
    assert first.stats["cache"] == "miss" and len(list(cache.glob("*.npz"))) == 2  # one file per source

    tokenized = []
    real = build.tokenize_sample

    def counting(sample, *args, **kwargs):
        tokenized.append(sample)
        return real(sample, *args, **kwargs)

    monkeypatch.setattr("tunesmith.data.build.tokenize_sample", counting)
    again = build_datasets(data_config(f"data: [{a}, {b}]\n"), tiny_tokenizer, cache_dir=cache)
    assert tokenized == [] and again.stats["cache"] == "hit"
    assert [s["rows_used"] for s in again.stats["sources"]] == [30, 20]  # no weights now: every row, from the cache
    assert [s["cache"] for s in again.stats["sources"]] == ["hit", "hit"]
    more = build_datasets(data_config(f"data: [{a}, {b}, {c}]\n"), tiny_tokenizer, cache_dir=cache)
    assert len(tokenized) == 7 and {source_of(s) for s in tokenized} == {"gamma"}  # only the new source
    assert [s["cache"] for s in more.stats["sources"]] == ["hit", "hit", "miss"]
    # the rows from the cache are the rows tokenising gives
    fresh = build_datasets(data_config(f"data: [{a}, {b}, {c}]\n"), tiny_tokenizer)
    assert [r.input_ids for r in more.train] == [r.input_ids for r in fresh.train]


def test_a_pool_of_processes_tokenises_the_same_rows(tiny_tokenizer, monkeypatch):
    import tunesmith.data.tokenizing as tokenizing
    from tunesmith.config import DataConfig

    samples = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                             {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(120)]
    places = [f"rows.jsonl, line {i + 1}" for i in range(120)]
    cfg = DataConfig(num_workers=2)
    alone = tokenizing.tokenize_rows(samples, places, tiny_tokenizer, cfg.model_copy(update={"num_workers": 1}))
    # as if the rows were many and slow: the pool takes over after the first chunk
    monkeypatch.setattr(tokenizing, "PARALLEL_MIN_ROWS", 10)
    monkeypatch.setattr(tokenizing, "CHUNK_ROWS", 20)
    monkeypatch.setattr(tokenizing, "POOL_PAYS_OFF_S", 0.0)
    started = []
    real = tokenizing._tokenize_in_pool
    monkeypatch.setattr(tokenizing, "_tokenize_in_pool", lambda *args: started.append(args[-2]) or real(*args))
    pooled = tokenizing.tokenize_rows(samples, places, tiny_tokenizer, cfg)
    assert started == [2] and pooled == alone
    # a row a worker refuses is the same sentence, with its place
    bad = samples[:60] + [{"messages": [{"role": "assistant", "content": "no user"}]}] + samples[60:]
    with pytest.raises(UserError, match=r"^rows\.jsonl, line 61: "):
        tokenizing.tokenize_rows(bad, places[:61] + places[60:], build_bad_template_tokenizer(), cfg)


def build_bad_template_tokenizer():
    """A tiny tokenizer whose template refuses a conversation that starts with the assistant (as many do)."""
    return build_tiny_tokenizer(
        "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('must start with the user') }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# --- preference data ----------------------------------------------------------------------------------------


def test_preference_sources_mix_with_their_own_columns(tiny_tokenizer, tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": f"Question {i}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."}
                                          for i in range(12)])
    b = write_rows(tmp_path / "b.jsonl", [{"q": f"Ask {i}?", "good": f"Yes {i}.", "bad": f"No {i}."}
                                          for i in range(12)])
    cfg = data_config(f"data: {{sources: [{{path: {a}, rows: 6}}, {{path: {b}, weight: 1, columns: {{prompt: q, "
                      "chosen: good, rejected: bad}}], validation_split: 0.25}\n")
    bundle = build_preference_data(cfg, tiny_tokenizer, "paired")
    assert [(s["rows_used"], s["format"]) for s in bundle.stats["sources"]] == [(6, "preference"), (12, "preference")]
    assert len(bundle.train) + len(bundle.validation) == 18
    with pytest.raises(UserError, match=r"data\.sources\[1\]\.path: .*b\.jsonl"):
        build_preference_data(data_config(f"data: [{a}, {b}]\n"), tiny_tokenizer, "paired")


# --- bad sources --------------------------------------------------------------------------------------------


def test_each_bad_source_is_a_sentence_naming_its_key(tiny_tokenizer, tmp_path):
    good = write_rows(tmp_path / "good.jsonl", qa_rows(4, "alpha"))

    def refused(second: str) -> str:
        with pytest.raises(UserError) as caught:
            build_datasets(data_config(f"data: [{good}, {second}]\n"), tiny_tokenizer)
        return str(caught.value)

    missing = refused(str(tmp_path / "nowhere.jsonl"))
    assert missing.startswith("data.sources[1].path: ") and "nowhere.jsonl does not exist" in missing
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data")
    folder = refused(str(tmp_path / "empty"))
    assert folder.startswith(f"data.sources[1].path: {tmp_path / 'empty'} is a folder, but ")
    assert "not one saved with Hugging Face datasets' save_to_disk" in folder and "nor a folder of data shards" in folder
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(qa_rows(1, "beta")[0]) + "\n" + json.dumps({"prompt": "no answer"}) + "\n")
    row = refused(str(bad))
    assert row.startswith(f"data.sources[1].path: {bad}, line 2: ") and 'field "completion" is missing' in row
    mapped = refused(f"{{path: {good}, columns: {{prompt: question}}}}")
    assert mapped.startswith("data.sources[1].columns maps prompt to the column 'question'"), mapped
    arrow = tmp_path / "broken.arrow"
    arrow.write_bytes(b"not arrow at all")
    assert refused(str(arrow)).startswith(f"data.sources[1].path: {arrow}: not a readable Arrow file")


def test_a_hub_id_offline_is_a_sentence_at_once(tiny_tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UserError) as caught:
        build_datasets(data_config("data: [someone/some-chat-data]\n"), tiny_tokenizer)
    message = str(caught.value)
    assert time.perf_counter() - started < 10
    assert message.startswith("data.sources[0].path: someone/some-chat-data is no file or folder here"), message
    assert "hub data set id" in message and "save_to_disk(DIR)) and point path at DIR" in message


def test_sequence_level_distillation_has_the_teacher_answer_the_mixed_rows(tmp_path):
    """Different tokenizers: the teacher answers the mixed training prompts, and the student trains on those
    answers alone (not on the sources again)."""
    import torch
    from transformers import LlamaForCausalLM

    folders = []
    for vocab in (700, 500):
        tokenizer = build_tiny_tokenizer(vocab_size=vocab)
        torch.manual_seed(1)
        folder = tmp_path / f"model-{vocab}"
        LlamaForCausalLM(build_tiny_llama_config(tokenizer)).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    a = write_rows(tmp_path / "a.jsonl", qa_rows(16, "alpha"))
    b = write_rows(tmp_path / "b.jsonl", alpaca_rows(16, "beta"))
    cfg = load_config(None, [
        f"teacher.name={folders[0]}", f"student.name={folders[1]}", f"data=[{{path: {a}, weight: 3}}, {b}]",
        "data.validation_split=0.25", "data.max_length=64", "distill.max_new_tokens=4", "training.batch_size=4",
        "training.max_steps=2", "eval.enabled=false",
    ])
    api.distill(cfg, tmp_path / "run")
    answers = (tmp_path / "run" / "teacher-answers.jsonl").read_text().splitlines()
    validation = (tmp_path / "run" / "validation.jsonl").read_text().splitlines()
    assert (len(answers), len(validation)) == (16, 5)  # 16 + 16/3 = 21 rows, a quarter held out
    student = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert "sources" not in student and student["path"].endswith("teacher-answers.jsonl")
    assert student["train"] == 16


def test_the_mix_example_mixes_dates_and_times_3_to_1(builtin_tokenizer):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "examples" / "mix.yaml")
    sources = [s.model_copy(update={"path": str(root / s.path)}) for s in cfg.data.sources]
    bundle = build_datasets(cfg.data.model_copy(update={"sources": sources}), builtin_tokenizer)
    assert [(s["format"], s["rows_used"], s["validation"]) for s in bundle.stats["sources"]] == [
        ("alpaca", 600, 30), ("prompt_completion", 200, 10)]
    times = [s for s in bundle.train_samples if s["messages"][0]["role"] == "system"]
    assert len(times) == 190 and times[0]["messages"][0]["content"].startswith("Reply with the time only")


def test_sources_without_weights_are_joined_each_row_once(tiny_tokenizer, tmp_path):
    """As axolotl's datasets: list and LLaMA-Factory's dataset: a,b do; a weight anywhere turns on the ratio rule."""
    a = write_rows(tmp_path / "a.jsonl", qa_rows(30, "a"))
    b = write_rows(tmp_path / "b.jsonl", qa_rows(6, "b"))
    joined = build_datasets(data_config(f"data: [{a}, {b}]\n"), tiny_tokenizer)
    assert [s["rows_used"] for s in joined.stats["sources"]] == [30, 6]
    assert len(joined.train) + len(joined.validation) == 36
    weighted = build_datasets(data_config(f"data: [{{path: {a}, weight: 1}}, {b}]\n"), tiny_tokenizer)
    assert [s["rows_used"] for s in weighted.stats["sources"]] == [6, 6]  # equal weights: b runs out first
