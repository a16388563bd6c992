"""The command line: errors are sentences with exit code 2, runs are never written over."""

import argparse
import json
import subprocess
import sys

import pytest

from tunesmith.api import new_run_dir
from tunesmith.cli import build_parser, main
from tunesmith.config import load_config


def _subcommands(parser: argparse.ArgumentParser):
    """(command, subcommand or None) for every command the parser has, read from the parser itself."""
    for action in parser._subparsers._group_actions:
        for name, child in action.choices.items():
            if child._subparsers is None:
                yield name, None
            else:
                yield from ((name, sub) for sub, _ in _subcommands(child))


def test_help_on_every_subcommand(capsys):
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # the command itself starts (one process: each takes seconds)
    assert "usage: tunesmith" in result.stdout
    commands = [[name, *([sub] if sub else [])] for name, sub in _subcommands(build_parser())]
    assert {"train", "convert", "estimate", "sweep", "studio", "doctor"} <= {argv[0] for argv in commands}
    for argv in commands:  # every subcommand's help, in this process
        with pytest.raises(SystemExit) as done:
            main([*argv, "--help"])
        assert done.value.code == 0, argv
        assert f"usage: tunesmith {' '.join(argv)}" in capsys.readouterr().out, argv


def test_a_config_error_is_one_sentence_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("training:\n  learning_rate: fast\n")
    code = main(["train", str(cfg), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "training.learning_rate" in err and "'fast'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_no_model_names_model_name(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {tmp_path}\n")
    code = main(["train", str(cfg), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.name" in err and "config.json" in err and "Traceback" not in err


def test_a_missing_data_file_names_data_path(tmp_path, capsys, tiny_llama, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    missing = tmp_path / "nope.jsonl"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {folder}\ndata:\n  path: {missing}\n")
    code = main(["train", str(cfg), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "data.path" in err and "nope.jsonl" in err and "Traceback" not in err


def test_an_existing_run_folder_is_never_written_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"keep": True}))
    with pytest.raises(Exception, match="already exists"):
        new_run_dir(None, load_config(None), str(run))
    assert json.loads((run / "summary.json").read_text()) == {"keep": True}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert new_run_dir(None, load_config(None), str(empty)) == empty
    assert new_run_dir("examples/quickstart.yaml", load_config(None)).name.startswith("quickstart-")


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capsys):
    """`tunesmith models | head -1`: the pipe closes under the writer; no BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    closed_pipe = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr("sys.stdout", closed_pipe)
    try:
        assert main(["models"]) == 141
    finally:
        monkeypatch.undo()
        try:
            closed_pipe.close()
        except BrokenPipeError:
            pass
    assert "Traceback" not in capsys.readouterr().err
