"""Shared test fixtures: a tiny in-memory tokenizer and Llama model, the real built-in tokenizer, data writers.

Everything here builds in milliseconds except `builtin_tokenizer`, which loads the
real SmolLM2-135M-Instruct tokenizer once per session (and skips when the models
package cannot provide it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# The fuzz tests (tests/test_fuzz_*.py) draw the same examples on every run, keep no example database, and
# have no per-example deadline (a case that hangs is caught by the test's own timeout instead).
settings.register_profile(
    "tunesmith", derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("tunesmith")

# Text the tiny tokenizer learns its merges from: the words the tests use, plus enough prose
# that common English pieces merge.  It is byte-level, so any other text still round-trips.
TINY_CORPUS = """
What is the capital of France? The capital of France is Paris.
What is the capital of Italy? The capital of Italy is Rome.
Translate to French: good morning. Bonjour.
Summarise the dialogue. Person one asks person two about the weather, and person two says it will rain.
Write a short poem about the sea. The sea is blue and wide, the waves roll in with the tide.
Add two numbers: 2 + 3 = 5. Multiply: 4 * 6 = 24. The answer is 42.
You are a helpful assistant. You are a tiny helpful assistant. Answer briefly and politely.
Hello! How can I help you today? Thank you very much. Good bye and have a nice day.
The instruction tells the model what to do, the input gives it context, and the output is the answer.
A user asks a question, the assistant replies, then the user asks again and the assistant answers again.
Tell me a joke. Why did the chicken cross the road? To get to the other side.
Name three colours: red, green and blue. Name three fruits: apple, banana and cherry.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step.
Doctor: How are you feeling today? Patient: I have trouble breathing when I run.
The meeting is at three thirty on Friday. Please bring the report and the numbers.
System prompt, user prompt, completion, conversation, message, role, content, value, human, model.
First paragraph of a document.

Second paragraph of the document, after a blank line.

Third paragraph with a list:
- one
- two
- three
"""

TINY_SYSTEM = "You are a tiny helpful assistant."

# ChatML with a default system message, the way SmolLM2's template does it.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + TINY_SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE, vocab_size: int = 700):
    """A byte-level BPE tokenizer trained in memory on TINY_CORPUS, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = TINY_CORPUS.split("\n")
    core.train_from_iterator(lines + ["\n\n".join(lines)] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token=None, unk_token=None
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE, a few hundred tokens, `<|im_end|>` as eos and pad, ChatML template with a default system message.

    Session-scoped: do not change it in a test (copy it with `build_tiny_tokenizer()` instead).
    """
    return build_tiny_tokenizer()


def build_tiny_llama_config(tokenizer):
    """A two-layer, 64-wide Llama config that matches `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def save_tiny_model_folder(root: Path, rows: list[dict]) -> tuple[Path, Path]:
    """(model folder, data file): a fresh tiny Llama (seed 0) and its tokenizer saved under root/tiny-llama
    as a Hugging Face folder, and `rows` written to root/train.jsonl: what a tiny training run needs."""
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(build_tiny_llama_config(tokenizer))
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


# Rows that a tiny model learns from visibly in a few steps (8 train and 2 validation rows with validation_split 0.2).
REPEAT_ROWS = [
    {"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
    for w in ["river", "stone", "cloud", "apple", "green", "music", "paper", "light", "house", "water"]
]


def save_tiny_run_config(root: Path, extra_yaml: str = "") -> Path:
    """root/run.yaml: a tiny Llama (saved beside it) trained on REPEAT_ROWS, without the before/after evaluation."""
    model_dir, data = save_tiny_model_folder(root, REPEAT_ROWS)
    config = root / "run.yaml"
    config.write_text(f"model: {{name: {model_dir}}}\ndata: {{path: {data}, validation_split: 0.2}}\n"
                      f"training: {{epochs: 100, learning_rate: 3.0e-3}}\neval: {{enabled: false}}\n{extra_yaml}")
    return config


@pytest.fixture
def tiny_llama_config(tiny_tokenizer):
    return build_tiny_llama_config(tiny_tokenizer)


@pytest.fixture
def tiny_llama(tiny_llama_config):
    """A fresh, randomly initialised (seed 0) two-layer Llama that matches `tiny_tokenizer`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config)


@pytest.fixture(scope="session")
def builtin_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML with a default system prompt)."""
    try:
        from tunesmith.models import builtin_path
    except ImportError:
        pytest.skip("tunesmith.models.builtin_path is not available")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_path("smollm2-135m-instruct"))


def train_child_signalled(tmp_path: Path, overrides: list[str], run_dir: Path, kill_at_step: int, sig: str):
    """`tunesmith train` (an empty config plus `overrides`) in a child process that sends itself `sig` ("SIGKILL",
    "SIGTERM") right after optimiser step `kill_at_step`; the finished subprocess.run result."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        import tunesmith.train.loop as loop
        from tunesmith.cli import main
        original = loop.after_optimizer_step
        def hook(model, step):
            original(model, step)
            if step == {kill_at_step}:
                os.kill(os.getpid(), signal.{sig})
        loop.after_optimizer_step = hook
        cfg = {str(tmp_path / 'cfg.yaml')!r}
        open(cfg, "w").write("{{}}\\n")
        args = ["train", cfg, "--output", {str(run_dir)!r}]
        for item in {overrides!r}:
            args += ["--set", item]
        sys.exit(main(args))
    """))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON, JSONL, CSV or Parquet, chosen by the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        names = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"write_rows: no writer for {suffix}")
    return path


@pytest.fixture
def write_data(tmp_path):
    """`write_data(rows, name="data.jsonl") -> Path`: rows written into the test's tmp folder (format by extension)."""

    def write(rows: list[dict], name: str = "data.jsonl") -> Path:
        return write_rows(tmp_path / name, rows)

    return write


@pytest.fixture
def write_jsonl(write_data):
    """`write_jsonl(rows, name="data.jsonl") -> Path`: one JSON object per line in the test's tmp folder."""

    def write(rows: list[dict], name: str = "data.jsonl") -> Path:
        if not name.endswith(".jsonl"):
            raise ValueError(f"write_jsonl writes .jsonl files, not {name}; use write_data for other formats")
        return write_data(rows, name)

    return write


@pytest.fixture
def log_lines():
    """Every line tunesmith logs (the `tunesmith` logger) while the test runs, in order."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect()
    logger = logging.getLogger("tunesmith")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


class Hang(BaseException):
    """A step ran past its time limit (a BaseException, so that no `except Exception` in the code swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float = 10):
    """Raise Hang in the test's (main) thread when the block runs longer than `seconds`; the signal also
    interrupts a blocking open() of a named pipe.  The fuzz tests run every case under one."""

    def stop(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# The studio's fixtures (tests/studio_fixtures.py) are registered here, once for the whole run.  A session fixture
# imported into several test modules would be made once per module, and two Playwright sync sessions cannot share
# a thread (the second finds the first's event loop running); one PostgreSQL cluster serves every module.
from studio_fixtures import (  # noqa: E402,F401  (fixtures: pytest finds them by name)
    blocked_requests,
    chromium_browser,
    page,
    postgres_cluster,
    postgres_url,
    studio_server,
)
