"""Text generation, one path for every command: `model.generate` with the GenerationConfig built here.

    generate_answers   greedy answers for many prompts, batched (evaluation, distillation)
    generate_reply     one reply, its text handed out piece by piece as it becomes final (serve)
    stream_reply_text  the same reply as an iterator of pieces (chat, generate)

All three decode the same way: greedy at temperature 0, else sampling with temperature and top-p (no
top-k, as in OpenAI's API); the answer ends at an end token (`end_token_ids`) or after max_new_tokens.
So a greedy reply of one prompt is the same whichever command asks for it: generate_answers with
batch size 1 (no padding) gives the text that generate_reply streams.

Everything is said to `generate` through one GenerationConfig, none of it as loose keyword arguments:
loose generation flags beside a config, or a model config edited to steer generation, are what
transformers warns about, and a warning printed into a chat is not part of the answer.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

# Temperatures below this decode greedily: sampling that cold picks the most likely token in all but float
# rounding, and logits divided by a temperature near 1e-300 overflow to inf, which no distribution holds.
GREEDY_BELOW = 1e-6


def end_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's eos (the end-of-turn token, e.g. `<|im_end|>`, for chat
    models) and whatever the model's generation config names as eos."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def generation_config(model, tokenizer, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0) -> GenerationConfig:
    """How every tunesmith command generates: greedy at temperature 0 (below GREEDY_BELOW); above it,
    sampling from softmax(logits / temperature) cut to the nucleus of top_p (the smallest set of most
    likely tokens whose probabilities add up to top_p; Holtzman et al. 2019, section 3.1).  top_k=0
    switches off transformers' default top-k of 50.  What is not set here (e.g. a repetition penalty)
    comes from the model's own generation_config.json, as `generate` merges the two."""
    ends = end_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (ends[0] if ends else None)
    if temperature >= GREEDY_BELOW:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        # Greedy, with the sampling knobs at their neutral values: many models' generation_config.json set
        # them for sampling, and transformers would fill them in and then warn that greedy decoding ignores them.
        sampling = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=ends or None, pad_token_id=pad,
                            use_cache=True, **sampling)


class ReplyStreamer(BaseStreamer):
    """Receives each new token from `generate` and hands out the reply's text as it becomes final.

    `generate` puts the prompt first (an encoder-decoder: its decoder start token), then one token per
    step.  After each token the reply so far is decoded again (special tokens skipped), and the part
    that can no longer change goes to `on_text`.  Held back until the next token: a trailing U+FFFD (a
    character whose bytes are still arriving) and a tail that is the start of a stop string.  A stop
    string ends the reply: it and what follows are never handed out, and `stopped` says so (a
    stopping criterion reads it).  Should a tokenizer rewrite text already handed out, nothing more
    goes out until the decoded text agrees with it again.  The pieces joined are the decoded reply
    (cut at a stop string) wherever decoding more tokens only extends the text, as byte-level BPE and
    SentencePiece do.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop: Iterable[str] = (),
                 lock: threading.Lock | None = None):
        self.tokenizer, self.on_text, self.stop = tokenizer, on_text, [s for s in stop if s]
        self.lock = lock or contextlib.nullcontext()  # held while decoding (a fast tokenizer is not thread-safe)
        self.tokens: list[int] = []  # the reply's tokens so far
        self.text = ""  # the reply decoded so far
        self.sent = ""  # the part of `text` handed out
        self.stopped = False  # a stop string was found
        self.tokens_to_stop: int | None = None  # how many tokens it took to complete the stop string
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt (or the decoder start token)
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.tokens.extend(value.reshape(-1).tolist())  # [1] or [1, 1]: one new token (batch size 1)
        with self.lock:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self._release(final=False)

    def end(self) -> None:
        """Generation ended: hand out what was held back."""
        if not self.stopped:
            self._release(final=True)

    def _release(self, final: bool) -> None:
        text = self.text
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            end = min(found)
            self.stopped, self.tokens_to_stop = True, len(self.tokens)
        else:
            end = len(text)
            if not final:
                while end > len(self.sent) and text[end - 1] == "\ufffd":
                    end -= 1
                # the longest tail of text[:end] that some stop string starts with
                end -= max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        if end > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):end])
            self.sent = text[:end]


class _StopWhen(StoppingCriteria):
    """Stops generation at a stop string (found by the streamer) or when the caller cancels."""

    def __init__(self, streamer: ReplyStreamer, cancelled: threading.Event):
        self.streamer, self.cancelled = streamer, cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = self.streamer.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)  # [batch]


@dataclass
class Reply:
    text: str  # the pieces handed out, joined
    finish_reason: str  # "stop" (an end token or a stop string), "length" (max_new_tokens) or "cancelled"
    completion_tokens: int  # tokens generated (through the end token, or the one completing the stop string)


@torch.no_grad()
def generate_reply(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int | None = None, stop: Iterable[str] = (),
                   on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None,
                   lock: threading.Lock | None = None) -> Reply:
    """One reply to `prompt_ids`, generated in this thread; each new piece of text goes to `on_text` as
    soon as it is final (ReplyStreamer).  It ends at an end token, a `stop` string, after
    `max_new_tokens`, or when `cancelled` is set (checked after every token).  `seed` makes a sampled
    reply repeatable: it seeds torch's global generator, which `generate` samples from.  `lock` is held
    around every use of the tokenizer here."""
    pieces: list[str] = []

    def hand_out(piece: str) -> None:
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)

    streamer = ReplyStreamer(tokenizer, hand_out, stop, lock)
    config = generation_config(model, tokenizer, max_new_tokens, temperature, top_p)
    if config.do_sample and seed is not None:
        torch.manual_seed(seed % 2**64)
    input_ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)  # [1, prompt]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_StopWhen(streamer, cancelled or threading.Event())]),
    )  # [1, prompt + new]; an encoder-decoder: [1, 1 + new], its decoder start token first
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else input_ids.shape[1]
    reply = out[0, start:].tolist()
    if streamer.stopped:
        # the stopping criterion hears of a stop string one token late: that token is not part of the reply
        return Reply("".join(pieces), "stop", streamer.tokens_to_stop)
    if reply and reply[-1] in (config.eos_token_id or []):
        return Reply("".join(pieces), "stop", len(reply))
    return Reply("".join(pieces), "length" if len(reply) >= max_new_tokens else "cancelled", len(reply))


def stream_reply_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int | None = None, stop: Iterable[str] = ()) -> Iterator[str]:
    """generate_reply as an iterator: the pieces of text as they are generated.

    `generate` runs on a thread of its own and this generator hands its pieces on.  Leaving the
    iteration early (Ctrl-C while waiting for the next piece, `break`, close()) cancels the generation,
    which stops after the token in progress, and waits for the thread, so the model is free again
    when this returns.  An exception in generation is raised here."""
    items: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    finished = object()

    def run() -> None:
        try:
            generate_reply(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, seed, stop,
                           on_text=items.put, cancelled=cancelled)
        except BaseException as exc:  # handed to the caller's thread, raised there
            items.put(exc)
        else:
            items.put(finished)

    thread = threading.Thread(target=run, name="tunesmith-generate", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not finished:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        thread.join()


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    device,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers for token-id prompts, batched with left padding (so every row's last prompt
    token sits at the same position) and the KV cache on; a row stops at its end token.
    Encoder-decoder models read right-padded prompts, and all they generate is the answer."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    config = generation_config(model, tokenizer, max_new_tokens)
    pad_id = config.pad_token_id
    answers: list[str] = [""] * len(prompts)
    # Longest first: rows of similar length share a batch, so less padding is computed.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with tqdm(total=len(prompts), desc=desc, unit="row", leave=False) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # [b, width]
            attention = torch.zeros((len(idx), width), dtype=torch.long)  # [b, width]
            for row, i in enumerate(idx):
                ids = prompts[i]
                start = 0 if encoder_decoder else width - len(ids)
                input_ids[row, start : start + len(ids)] = torch.tensor(ids)
                attention[row, start : start + len(ids)] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config
            )  # [b, width + new]; encoder-decoder: [b, 1 + new], the decoder start token first
            for row, i in enumerate(idx):
                answer = out[row] if encoder_decoder else out[row, width:]
                answers[i] = tokenizer.decode(answer, skip_special_tokens=True).strip()
            bar.update(len(idx))
    model.train(was_training)
    return answers
