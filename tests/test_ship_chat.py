"""`tunesmith chat` and `tunesmith generate` on a tiny random Llama run: the streamed answer is the greedy
answer evaluation gives (one generation path), no warning reaches the conversation, the conversation keeps
its history until /reset, generate prints the answer alone."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from test_ship_merge import SYSTEM, make_tiny_run, run_cli

from tunesmith.data import encode_prompt
from tunesmith.errors import UserError
from tunesmith.models.generate import generate_answers
from tunesmith.ship.chat import chat_repl, load_for_chat, stream_reply
from tunesmith.ship.merge import merge_run

QUESTION = "Say the colour of the sky."


def _main(argv: list[str]) -> int:
    return run_cli(argv)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def loaded(lora_run):
    model, tokenizer, task, system = load_for_chat(lora_run)
    return model, tokenizer, task, system


def _greedy(model, tokenizer, messages, max_new_tokens=16):
    return generate_answers(model, tokenizer, [encode_prompt(messages, tokenizer)], max_new_tokens, 1, "cpu")[0]


def test_streamed_answer_is_the_greedy_answer(loaded):
    model, tokenizer, task, system = loaded
    assert system == SYSTEM  # the run's data.system_prompt is the default
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    pieces = list(stream_reply(model, tokenizer, messages, task, max_new_tokens=16))
    answer = "".join(pieces).strip()
    assert answer and answer == _greedy(model, tokenizer, messages)
    with model.disable_adapter():  # the random base rambles on: a long answer in many pieces
        pieces = list(stream_reply(model, tokenizer, messages, task, max_new_tokens=24))
        assert len(pieces) >= 5 and "".join(pieces).strip() == _greedy(model, tokenizer, messages, 24)


def test_seq2seq_streamed_answer_is_the_greedy_answer():
    from conftest import build_tiny_tokenizer
    from test_tasks import _t5

    from tunesmith.data.tokens import plain_prompt
    from tunesmith.models.tasks import SEQ2SEQ

    tokenizer = build_tiny_tokenizer()
    model = _t5(len(tokenizer)).eval()
    messages = [{"role": "user", "content": "Summarise the dialogue."}]
    answer = "".join(stream_reply(model, tokenizer, messages, SEQ2SEQ, max_new_tokens=12)).strip()
    expected = generate_answers(model, tokenizer, [tokenizer(plain_prompt(messages))["input_ids"]], 12, 1, "cpu")[0]
    assert answer and answer == expected


def test_no_warning_reaches_the_conversation(loaded, tiny_llama, tiny_tokenizer):
    """transformers 5 warns (FutureWarning) about a decode loop that passes `past_key_values`, and logs a
    warning when a model's generation_config.json sets sampling flags that greedy decoding then ignores.
    Chat generates the current way, through one GenerationConfig, so neither appears, greedy or sampled."""
    model, tokenizer, task, system = loaded
    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    # a model whose generation_config.json asks for sampling, as many instruct models' do
    sampling = tiny_llama.generation_config
    sampling.do_sample, sampling.temperature, sampling.top_p, sampling.top_k = True, 0.7, 0.9, 20
    logged: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would be an exception here
            for m, t, kind in ((model, tokenizer, task), (tiny_llama, tiny_tokenizer, "causal_lm")):
                assert "".join(stream_reply(m, t, messages, kind, max_new_tokens=8))
                assert "".join(stream_reply(m, t, messages, kind, max_new_tokens=8, temperature=0.8, top_p=0.9,
                                            seed=1))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in logged] == []


def test_sampling_follows_temperature_top_p_and_seed(loaded):
    model, tokenizer, task, _ = loaded
    messages = [{"role": "user", "content": QUESTION}]
    with model.disable_adapter():  # the random base: many tokens are likely, so samples differ
        greedy = "".join(stream_reply(model, tokenizer, messages, task, max_new_tokens=12))
        first, again, other = ("".join(stream_reply(model, tokenizer, messages, task, max_new_tokens=12,
                                                    temperature=1.5, seed=seed)) for seed in (7, 7, 8))
        assert first == again and first != other  # a seed repeats a sample
        assert first != greedy
        # a nucleus this small holds the most likely token alone: sampling from it is greedy decoding
        assert "".join(stream_reply(model, tokenizer, messages, task, max_new_tokens=12, temperature=1.5,
                                    top_p=1e-9, seed=7)) == greedy


def _recording(loaded, calls):
    model, tokenizer, task, _ = loaded

    def reply(messages):
        calls.append([dict(m) for m in messages])
        return stream_reply(model, tokenizer, messages, task, max_new_tokens=12)

    return reply


def test_chat_keeps_history_until_reset(loaded):
    model, tokenizer, _, _ = loaded
    calls: list[list[dict]] = []
    stdin = io.StringIO(f"{QUESTION}\nName a fruit.\n/reset\nCount to three.\n/exit\nnever read\n")
    out = io.StringIO()
    assert chat_repl(_recording(loaded, calls), system=SYSTEM, stdin=stdin, out=out) == 0
    assert len(calls) == 3
    system = {"role": "system", "content": SYSTEM}
    first_answer = _greedy(model, tokenizer, calls[0], 12)
    assert calls[0] == [system, {"role": "user", "content": QUESTION}]
    assert calls[1] == [system, {"role": "user", "content": QUESTION}, {"role": "assistant", "content": first_answer},
                        {"role": "user", "content": "Name a fruit."}]
    second_prompt = tokenizer.decode(encode_prompt(calls[1], tokenizer))
    assert QUESTION in second_prompt and first_answer in second_prompt
    assert calls[2] == [system, {"role": "user", "content": "Count to three."}]  # /reset kept only the system prompt
    shown = out.getvalue()
    assert f"assistant> {first_answer}\n" in shown
    assert f"assistant> {_greedy(model, tokenizer, calls[1], 12)}\n" in shown
    assert "(history cleared)" in shown and "never read" not in shown


def test_chat_ends_at_end_of_input_and_ctrl_c_stops_one_answer():
    calls = []

    def reply(messages):
        calls.append(messages)
        yield "Half an ans"
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-answer
        yield "wer."

    out = io.StringIO()
    assert chat_repl(reply, stdin=io.StringIO("first\nsecond\n"), out=out) == 0  # no /exit: end of input
    assert calls[1] == [{"role": "user", "content": "second"}]  # the stopped turn was not kept
    assert "(stopped; this turn is not kept)" in out.getvalue() and "Half an answer." in out.getvalue()

    class CtrlC(io.StringIO):
        def readline(self, *args):
            raise KeyboardInterrupt

    assert chat_repl(reply, stdin=CtrlC(), out=io.StringIO()) == 0


def test_generate_prints_only_the_answer(lora_run, loaded, tmp_path, capsys):
    model, tokenizer, _, _ = loaded
    expected = _greedy(model, tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    assert _main(["generate", str(lora_run), "--prompt", QUESTION, "--max-new-tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert expected and captured.out == expected + "\n"
    assert "loading" in captured.err

    # A merged folder answers the same, with the run's system prompt remembered in tunesmith_merge.json.
    merge_run(lora_run, tmp_path / "merged")
    capsys.readouterr()  # merge's own progress lines
    assert _main(["generate", str(tmp_path / "merged"), "--prompt", QUESTION, "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    without_system = _greedy(model, tokenizer, [{"role": "user", "content": QUESTION}])
    assert _main(["generate", str(lora_run), "--prompt", QUESTION, "--system", "", "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == without_system + "\n"


def test_chat_and_generate_refusals_are_sentences(lora_run, tmp_path, capsys):
    for argv, words in [
        (["generate", str(lora_run), "--prompt", "  "], "--prompt is empty"),
        (["generate", str(lora_run), "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0"),
        (["chat", str(lora_run), "--top-p", "0"], "--top-p 0"),
        (["chat", str(lora_run), "--temperature", "-1"], "--temperature -1"),
        (["chat", str(tmp_path)], "config.yaml"),
    ]:
        assert _main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, argv
    with pytest.raises(UserError, match="not a folder"):
        load_for_chat(tmp_path / "nope")
