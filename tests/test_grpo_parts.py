"""GRPO's parts below the loop: the reward functions (prefer/rewards.py) and the sampled groups (prefer/sampling.py).

Rewards are scored on hand-written completions; sampling runs on the tiny random Llama of conftest.py, with an
output bias that makes its end token likely (so some answers end early and some run to max_new_tokens).
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from tunesmith.config import ObjectiveConfig
from tunesmith.errors import UserError
from tunesmith.prefer.rewards import make_rewards
from tunesmith.prefer.sampling import sample_groups


def rewards_of(*rewards, answer_regex=None):
    return make_rewards(ObjectiveConfig(type="grpo", rewards=list(rewards)), answer_regex)


def score(rewards, completions, references, prompts=None):
    prompts = prompts or ["q"] * len(completions)
    return rewards(prompts, completions, references)


# --- rewards ------------------------------------------------------------------------------------------------


def test_exact_match_normalises_and_takes_any_reference():
    rewards = rewards_of("exact_match")
    completions = ["Paris.", "  the   PARIS ", "Rome", "paris is nice", ""]
    totals, by_name = score(rewards, completions, [["paris"], ["Paris"], ["paris", "rome"], ["paris"], [""]])
    assert totals == [1.0, 1.0, 1.0, 0.0, 0.0]  # an empty reference matches nothing, not even an empty answer
    assert by_name == {"exact_match": totals}


def test_exact_match_compares_what_answer_regex_captures():
    rewards = rewards_of("exact_match", answer_regex=r"(\d{4}-\d{2}-\d{2})")
    completions = ["It was on 2021-03-04, a Thursday.", "It was on 2021-03-05.", "Some day in March."]
    totals, _ = score(rewards, completions, [["2021-03-04"]] * 3)
    assert totals == [1.0, 0.0, 0.0]
    # GSM8K's shape: the reference is a worked solution, its answer after ####; a regex without a group compares
    # the whole match
    gsm = rewards_of("exact_match", answer_regex=r"#### (\S+)")
    totals, _ = score(gsm, ["so 3 + 4 = 7\n#### 7", "#### 8", "7"], [["3 + 4 is 7.\n#### 7"]] * 3)
    assert totals == [1.0, 0.0, 0.0]  # no match in the completion: no answer
    whole = rewards_of("exact_match", answer_regex=r"\d+")
    assert score(whole, ["about 42 apples"], [["42"]])[0] == [1.0]


ANSWER_TEXTS = ["Paris.", "  The  answer ", "A cat!", "an", "...", "", "2021-03-04", "The U.S.A.", "x\ty\nz ?",
                "#### 42", "answer: the 42.", "#### ", "ÉCOLE"]
ANSWER_REGEXES = [None, "", r"#### (\S*)", r"\d+", r"answer: (.*)", r"(a)?nswer", r"(\d{4}-\d{2}-\d{2})"]


def test_exact_match_reward_agrees_with_evaluations_exact_match():
    """A GRPO reward and `tunesmith eval` must agree on what is right: both compare through data/answers.py."""
    from tunesmith.config import ObjectiveConfig
    from tunesmith.evaluate.metrics import exact_match
    from tunesmith.prefer.rewards import make_rewards

    for regex in ANSWER_REGEXES:
        rewards = make_rewards(ObjectiveConfig(type="grpo", rewards=[{"type": "exact_match"}]), regex or None)
        for reference in ANSWER_TEXTS:
            got = rewards([""] * len(ANSWER_TEXTS), ANSWER_TEXTS, [[reference]] * len(ANSWER_TEXTS))[0]
            wanted = [1.0 if exact_match(text, [reference], regex or None) else 0.0 for text in ANSWER_TEXTS]
            assert got == wanted, (regex, reference)


def test_number_reward_within_tolerance_with_commas_and_signs():
    rewards = rewards_of({"type": "number", "tolerance": 0.01})
    completions = [
        "The total is 1,234,567.",     # commas
        "It comes to -3.5 degrees",    # a sign and decimals
        "First 12, then 40.004",       # the last number counts, within 0.01
        "about 40.2",                  # outside the tolerance
        "no number here",
        "from 2021-03-04",             # a hyphen between numbers is no minus sign: the last number is 4
        "+7",
    ]
    references = [["1234567"], ["The answer is -3.50"], ["40"], ["40"], ["0"], ["4"], ["7.0"]]
    totals, _ = score(rewards, completions, references)
    assert totals == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    exact = rewards_of({"type": "number"})  # the default tolerance, 1e-6
    assert score(exact, ["-12", "12", "12.0000001"], [["12"], ["-12, no: 12"], ["12"]])[0] == [0.0, 1.0, 1.0]


def test_number_reward_reads_the_extracted_answer():
    rewards = rewards_of("number", answer_regex=r"#### (.+)")
    totals, _ = score(rewards, ["3 apples, 4 pears\n#### 7", "7 in all\n#### 8", "7"], [["#### 7"]] * 3)
    assert totals == [1.0, 0.0, 0.0]


def test_regex_reward_and_its_pattern():
    rewards = rewards_of({"type": "regex", "pattern": r"<answer>.+</answer>"})
    totals, _ = score(rewards, ["x <answer>4</answer> y", "<answer></answer>", "4"], [["4"]] * 3)
    assert totals == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match=r"objective\.rewards\[1\]\.pattern: a regex reward needs a pattern"):
        rewards_of("length", "regex")
    with pytest.raises(UserError, match=r"objective\.rewards\[0\]\.pattern: `\(unclosed` is not a regular expression"):
        rewards_of({"type": "regex", "pattern": "(unclosed"})
    with pytest.raises(UserError, match=r"eval\.answer_regex: `\[` is not a regular expression"):
        rewards_of("exact_match", answer_regex="[")


def test_length_reward_peaks_at_target():
    rewards = rewards_of({"type": "length", "target": 10})
    totals, _ = score(rewards, ["x" * 10, "", "x" * 20, "x" * 5, "x" * 15, "x" * 50], [[""]] * 6)
    assert totals == [1.0, 0.0, 0.0, 0.5, 0.5, 0.0]


def test_weighted_sum_and_names():
    rewards = rewards_of(
        {"type": "exact_match", "weight": 2.0},
        {"type": "regex", "pattern": "Paris", "weight": 0.5},
        {"type": "regex", "pattern": r"\.$", "weight": -1.0},
        {"type": "length", "target": 6, "weight": 1.0},
    )
    assert rewards.names == ["exact_match", "regex", "regex_2", "length"]
    totals, by_name = score(rewards, ["Paris.", "Rome"], [["paris"], ["paris"]])
    assert by_name == {"exact_match": [1.0, 0.0], "regex": [1.0, 0.0], "regex_2": [1.0, 0.0],
                       "length": pytest.approx([1.0, 4 / 6])}
    assert totals == pytest.approx([2.0 + 0.5 - 1.0 + 1.0, 4 / 6])


REWARD_MODULE = '''
def brevity(prompts, completions, references):
    return [1.0 / (1 + len(c)) for c in completions]

def echo(prompts, completions, references):
    return [float(p == c) + 10 * len(r) for p, c, r in zip(prompts, completions, references)]

def wrong_length(prompts, completions, references):
    return [1.0]

def nan(prompts, completions, references):
    return [float("nan")] * len(completions)

def text(prompts, completions, references):
    return ["1.0"] * len(completions)

def none(prompts, completions, references):
    return None

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module of reward functions in a fresh working directory; its name is unique to the test, so a module
    of the same name imported by another test (sys.modules) cannot stand in for it."""
    name = f"grpo_rewards_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def test_python_reward_is_imported_from_the_working_directory(reward_module, tmp_path):
    rewards = rewards_of({"type": "python", "function": f"{reward_module}:brevity", "weight": 2.0},
                         {"type": "python", "function": f"{reward_module}:echo"})
    assert rewards.names == [f"{reward_module}:brevity", f"{reward_module}:echo"]
    assert str(tmp_path) not in sys.path  # on sys.path for the import only
    totals, by_name = rewards(["hi", "yo"], ["hi", "four"], [["a"], ["a", "b"]])
    assert by_name[f"{reward_module}:brevity"] == [1 / 3, 1 / 5]
    assert by_name[f"{reward_module}:echo"] == [11.0, 20.0]
    assert totals == pytest.approx([2 / 3 + 11, 2 / 5 + 20])


@pytest.mark.parametrize("function, says", [
    (None, "a python reward needs a function"),
    ("no_colon", "is not module:function"),
    ("rewards.py:score", "names a file"),
    ("sub/rewards:score", "names a file"),
    ("no_such_module_xyz:score", "cannot import module `no_such_module_xyz`.*ModuleNotFoundError"),
    ("{module}:absent", "has no `absent`"),
    ("{module}:NOT_A_FUNCTION", "is a value of type int, not a function"),
    ("{broken}:score", "cannot import module .*ZeroDivisionError"),
    ("{syntax}:score", "cannot import module .*SyntaxError"),
])
def test_bad_python_targets_are_user_errors(reward_module, tmp_path, function, says):
    (tmp_path / f"{reward_module}_broken.py").write_text("1 / 0\n")
    (tmp_path / f"{reward_module}_syntax.py").write_text("def score(:\n")
    if function:
        function = function.format(module=reward_module, broken=f"{reward_module}_broken",
                                   syntax=f"{reward_module}_syntax")
    with pytest.raises(UserError, match=r"objective\.rewards\[1\]\.function: .*" + says):
        rewards_of("exact_match", {"type": "python", "function": function})
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize("name, says", [
    ("wrong_length", r"returned \[1\.0\] for 2 completions; return a list of 2 numbers"),
    ("nan", r"returned nan among its values"),
    ("text", r"returned '1\.0' among its values"),
    ("none", r"returned None for 2 completions"),
])
def test_bad_python_returns_are_user_errors(reward_module, name, says):
    rewards = rewards_of({"type": "python", "function": f"{reward_module}:{name}"})
    with pytest.raises(UserError, match=rf"objective\.rewards\[0\]\.function: `{reward_module}:{name}` {says}"):
        rewards(["p", "p"], ["a", "b"], [["r"], ["r"]])


# --- sampling -----------------------------------------------------------------------------------------------

PROMPT_TEXTS = ["What is the capital of France?", "Add two numbers: 2 + 3 =", "Hello!", "Tell me a joke about the sea."]


@pytest.fixture
def likely_end(tiny_llama):
    """(model, tokenizer): the tiny Llama with an output bias that makes its end token about 1 in 14 at every step,
    and a tokenizer (a copy) whose pad token, <|endoftext|>, is no end token and which the model never writes,
    so a pad token in a completion can only be padding."""
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    head = torch.nn.Linear(tiny_llama.lm_head.in_features, tiny_llama.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(tiny_llama.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 4.0  # e^4 / (e^4 + 699): about 7%
        head.bias[tokenizer.pad_token_id] = -1e4
    tiny_llama.lm_head = head
    return tiny_llama, tokenizer


def prompt_ids(tokenizer):
    return [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]


def test_groups_end_at_the_end_token_and_hold_no_padding(likely_end):
    model, tokenizer = likely_end
    prompts = prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) > 1  # prompts of several lengths: batches are padded
    groups = sample_groups(model, tokenizer, prompts, group_size=3, max_new_tokens=12, temperature=1.0,
                           top_p=1.0, seed=0, batch_size=4)
    assert [len(g) for g in groups] == [3] * len(prompts)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    lengths = []
    for completion in (c for g in groups for c in g):
        assert 1 <= len(completion) <= 12 and pad not in completion
        assert eos not in completion[:-1]  # nothing after the end token
        assert completion[-1] == eos or len(completion) == 12
        lengths.append(len(completion))
    assert min(lengths) < 12 and 12 in lengths  # both ways of ending happened


def test_same_seed_same_groups_whatever_ran_before(likely_end):
    model, tokenizer = likely_end
    prompts = prompt_ids(tokenizer)

    def sample(seed):
        return sample_groups(model, tokenizer, prompts, group_size=4, max_new_tokens=8, temperature=1.0,
                             top_p=0.9, seed=seed, batch_size=5)

    state = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), state)  # torch's generator is left as it was
    torch.rand(1000)  # something else draws from torch's generator in between
    assert sample(7) == first
    assert sample(8) != first
    assert len({tuple(c) for g in first for c in g}) > len(prompts)  # sampled: a group's answers differ


def greedy_by_hand(model, prompt, max_new_tokens, ends):
    """The greedy continuation, one whole forward per token: no cache, no padding, no generate."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in ends:
                break
    return ids[len(prompt):]


def test_cold_sampling_is_greedy_for_any_batch_size(tiny_llama, tiny_tokenizer):
    from tunesmith.models.generate import GREEDY_BELOW, end_token_ids

    model, tokenizer = tiny_llama.eval(), tiny_tokenizer  # pad == eos, as in many chat tokenizers
    prompts = prompt_ids(tokenizer)
    expected = [greedy_by_hand(model, p, 10, set(end_token_ids(model, tokenizer))) for p in prompts]
    for batch_size in (1, 4):
        groups = sample_groups(model, tokenizer, prompts, group_size=2, max_new_tokens=10,
                               temperature=GREEDY_BELOW / 10, top_p=1.0, seed=batch_size, batch_size=batch_size)
        assert groups == [[e, e] for e in expected]


def test_sampling_uses_the_cache_in_eval_mode_and_restores_modes(tiny_llama, tiny_tokenizer, capfd):
    """As training leaves it: a LoRA model with dropout, in train mode, config.use_cache False, gradient
    checkpointing on.  Sampling runs with dropout off and the KV cache on (each forward after the first reads one
    new token per row), says nothing on stderr, and gives every module its mode back."""
    from peft import LoraConfig, get_peft_model

    tiny_llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(tiny_llama, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj"]))
    model.train()
    model.base_model.model.config.use_cache = False
    frozen = model.base_model.model.model.layers[0].mlp
    frozen.eval()  # a module kept in eval mode inside a training model keeps it
    calls = []

    def record(module, args, kwargs):
        calls.append((kwargs["input_ids"].shape, any(m.training for m in module.modules())))

    hook = model.base_model.model.register_forward_pre_hook(record, with_kwargs=True)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = sample_groups(model, tiny_tokenizer, prompt_ids(tiny_tokenizer)[:2], group_size=2,
                               max_new_tokens=6, temperature=1.0, top_p=1.0, seed=0, batch_size=4)
    hook.remove()
    assert [len(g) for g in groups] == [2, 2]
    assert not any(training for _, training in calls)  # eval mode: no dropout
    width = calls[0][0][1]
    assert width > 1 and all(shape == (4, 1) for shape, _ in calls[1:]) and len(calls) > 1  # the cache at work
    assert model.training and all(m.training for m in model.base_model.model.model.layers[1].modules())
    assert not any(m.training for m in frozen.modules())
    assert [str(w.message) for w in caught] == [] and capfd.readouterr().err == ""


def test_no_prompts_no_groups(tiny_llama, tiny_tokenizer):
    assert sample_groups(tiny_llama, tiny_tokenizer, [], group_size=2, max_new_tokens=4, temperature=1.0,
                         top_p=1.0, seed=0, batch_size=2) == []
