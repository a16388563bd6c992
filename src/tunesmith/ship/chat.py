"""Talking to a trained model: `tunesmith chat RUN_DIR` (a terminal conversation, streamed) and
`tunesmith generate RUN_DIR --prompt TEXT` (one answer on stdout, for scripts).

Both take a run folder (base + adapter as a PeftModel, or a full fine-tune's model/) or a merged folder,
format the conversation with the model's own chat template exactly as training did
(tunesmith.data.tokens.encode_prompt), and decode greedily unless a temperature is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from tunesmith.data import encode_prompt
from tunesmith.data.tokens import plain_prompt
from tunesmith.errors import UserError
from tunesmith.models.generate import stream_reply_text
from tunesmith.models.loader import model_task
from tunesmith.models.run_folder import load_for_inference, open_run
from tunesmith.models.tasks import MASKED_LM, SEQ2SEQ
from tunesmith.ship.merge import MERGE_INFO

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
CHAT_HELP = (
    "/reset clears the history (the system prompt stays); /exit, Ctrl-D or Ctrl-C at the prompt quits; Ctrl-C during "
    "an answer stops it."
)


def prompt_ids(messages: list[dict], tokenizer, task: str = "causal_lm") -> list[int]:
    """The ids a model reads before answering: the chat template with the generation prompt (as in
    training and evaluation); a seq2seq model's encoder reads the conversation as plain text instead."""

    if task == SEQ2SEQ:
        return list(tokenizer(plain_prompt(messages))["input_ids"])
    return encode_prompt(messages, tokenizer)


def stream_reply(model, tokenizer, messages: list[dict], task: str = "causal_lm",
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> Iterator[str]:
    """Answer a conversation (a list of {"role", "content"}), yielding the text as it is generated.

    The generation every command shares (tunesmith.models.generate.stream_reply_text: the model's own
    `generate` on a thread, a streamer handing out the text): greedy by default, so the answer is the
    one evaluation's generate_answers gives; sampled when `temperature` is above 0 (`seed` repeats a
    sample).  It ends at an end-of-turn/eos token (not shown) or after `max_new_tokens`; Ctrl-C while
    it streams stops the generation.  The whole conversation is read afresh on every call (no cache is
    kept between turns), so a long conversation costs a longer prefill each turn.
    """
    ids = prompt_ids(messages, tokenizer, task)
    return stream_reply_text(model, tokenizer, ids, max_new_tokens, temperature, top_p, seed)


def chat_repl(reply: Callable[[list[dict]], Iterator[str]], system: str | None = None,
              stdin=None, out=None) -> int:
    """A terminal conversation: read a line, stream `reply(messages)` to `out`, keep both in the history.

    `messages` is the system prompt (when there is one), the turns so far, and the new user line.
    `/reset` empties the history (the system prompt stays); `/exit`, end of input (Ctrl-D) and Ctrl-C at
    the prompt end the conversation; Ctrl-C during an answer stops it, and that turn is not kept.
    `stdin` is read line by line when given (tests, pipes); otherwise input() reads the terminal, with
    line editing.  Returns 0.
    """
    out = out or sys.stdout

    def read(prompt: str) -> str:
        if stdin is None:
            return input(prompt)  # EOFError at Ctrl-D
        out.write(prompt)
        out.flush()
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    head = [{"role": "system", "content": system}] if system else []
    history: list[dict] = []
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            out.write("(history cleared)\n")
            continue
        user = {"role": "user", "content": line}
        out.write("assistant> ")
        out.flush()
        pieces = []
        try:
            for piece in reply([*head, *history, user]):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write("\n(stopped; this turn is not kept)\n")
            continue
        except UserError as exc:  # e.g. a chat template that refuses a system message
            out.write(f"\ntunesmith: {exc}\n")
            continue
        out.write("\n")
        history += [user, {"role": "assistant", "content": "".join(pieces).strip()}]


def load_for_chat(run_dir: str | Path):
    """(model, tokenizer, task, default system prompt) for a run folder or a merged folder; a masked
    language model is refused (it fills in blanks, it does not write answers)."""

    handle = open_run(run_dir)
    if model_task(handle.source, handle.cfg) == MASKED_LM:
        raise UserError(f"{run_dir} holds a masked-language model (BERT-style), which fills in hidden words and "
                        "cannot write answers; chat and generate need a causal or seq2seq model.")
    system = handle.cfg.data.system_prompt
    info_file = handle.path / MERGE_INFO
    if handle.kind == "folder" and info_file.is_file():  # a merged run remembers its system prompt
        try:
            system = json.loads(info_file.read_text()).get("system_prompt")
        except (ValueError, AttributeError):
            system = None
    with contextlib.redirect_stdout(sys.stderr):  # loading notices must not mix with answers on stdout
        log.info(f"tunesmith: loading {handle.path} ({handle.kind})")
        model, tokenizer, task = load_for_inference(handle)
    return model, tokenizer, task, system
