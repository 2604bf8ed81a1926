"""What `lorakit eval` measures: loss and perplexity on the trained tokens; on replies, exact match and token F1
(lorakit's own), ROUGE-L (rouge-score) and chrF and BLEU (sacrebleu), as a recipe or --metrics chooses."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

# Rows of a loss batch are capped so that rows x longest row stays under this many tokens: the logits of a batch
# take tokens x vocabulary x 2-4 bytes (8,192 tokens of a 150k vocabulary in bfloat16: 2.4 GB).
MAX_LOSS_BATCH_TOKENS = 8192
WORD = re.compile(r"\w+|[^\w\s]")
# Reply metrics: name -> (what it suits, the package it needs or None). exact_match, token_f1 and rouge_l are 0-1
# (the mean over replies); chrf and bleu are sacrebleu's corpus scores, 0-100, as they are usually quoted.
REPLY_METRICS = {
    "exact_match": ("short, fixed answers: extraction, classification as text, formats", None),
    "token_f1": ("short answers with partial credit: QA, fields of a record", None),
    "rouge_l": ("summaries and other long free text: the longest common word sequence, F-measure", "rouge-score"),
    "chrf": ("translation and text in inflected languages: character n-gram F-score", "sacrebleu"),
    "bleu": ("translation, comparable with published BLEU: word n-gram precision, corpus-level", "sacrebleu"),
}
DEFAULT_REPLY_METRICS = ("exact_match", "token_f1")
MODULES = {"rouge-score": "rouge_score", "sacrebleu": "sacrebleu"}


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the reply equals the reference once leading and trailing whitespace is stripped."""
    return float(prediction.strip() == reference.strip())


def words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: 'Age: 19.' -> ['age', ':', '19', '.']."""
    return WORD.findall(text.lower())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the reply's words against the reference's (as a bag of words).

    Partial credit for a reply that gets some of the content right; 1.0 for two empty texts.
    """
    predicted, expected = words(prediction), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def check_reply_metrics(names: list[str], where: str) -> list[str]:
    """The metric names, each known and with its package installed: checked before any model is loaded."""
    import importlib.util

    from lorakit.errors import LorakitError

    for name in names:
        if name not in REPLY_METRICS:
            raise LorakitError(f"{where}: unknown metric {name!r}; choose from {', '.join(REPLY_METRICS)}")
        package = REPLY_METRICS[name][1]
        if package and importlib.util.find_spec(MODULES[package]) is None:
            raise LorakitError(f"{where}: {name} needs the {package} package, which is not installed: "
                               f"pip install {package} (or pip install 'lorakit[metrics]')")
    return list(dict.fromkeys(names))


def score_replies(predictions: list[str], references: list[str],
                  names: list[str]) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """({metric: score over all replies}, {metric: score of each reply}) for the chosen metrics."""
    overall: dict[str, float | None] = {}
    per_reply: dict[str, list[float]] = {}
    pairs = list(zip(predictions, references))
    for name in names:
        if name in ("exact_match", "token_f1"):
            scores = [(exact_match if name == "exact_match" else token_f1)(p, r) for p, r in pairs]
        elif name == "rouge_l":
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
            scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
        else:
            import sacrebleu

            sentence = sacrebleu.sentence_chrf if name == "chrf" else sacrebleu.sentence_bleu
            corpus = sacrebleu.corpus_chrf if name == "chrf" else sacrebleu.corpus_bleu
            scores = [sentence(p, [r]).score for p, r in pairs]
            overall[name] = corpus([p for p, _ in pairs], [[r for _, r in pairs]]).score if pairs else None
            per_reply[name] = scores
            continue
        overall[name] = sum(scores) / len(scores) if scores else None
        per_reply[name] = scores
    return overall, per_reply


@dataclass
class LossResult:
    loss: float  # mean negative log-likelihood per trained token, in nats
    tokens: int  # trained tokens it is averaged over

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def completion_loss(model, rows: list[tuple[list[int], list[int]]], *, pad_token_id: int, batch_size: int,
                    on_batch: Callable[[int, int], None] | None = None) -> LossResult:
    """Loss over the tokens whose label is set (the completions, as trained), averaged over all of them.

    rows: (input_ids, labels) pairs as lorakit.data tokenizes them, with lorakit.data.IGNORE on untrained tokens.
    Every trained token weighs the same, whichever row it is in, so the figure does not depend on batching.
    """
    import torch
    import torch.nn.functional as F

    from lorakit.data.labels import IGNORE

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    total_nll, total_tokens, done = 0.0, 0, 0
    start = 0
    while start < len(order):
        width = len(rows[order[start]][0])
        count = max(1, min(batch_size, MAX_LOSS_BATCH_TOKENS // max(width, 1)))
        chosen = order[start:start + count]
        ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, index in enumerate(chosen):
            row_ids, row_labels = rows[index]
            ids[row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            labels[row, :len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
            mask[row, :len(row_ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # Position t predicts token t+1, as in the model's own loss; only trained positions are upcast.
            targets = labels[:, 1:].to(device)
            trained = targets != IGNORE
            selected = logits[:, :-1][trained].float()
            total_nll += F.cross_entropy(selected, targets[trained], reduction="sum").item()
            total_tokens += int(trained.sum())
        start += count
        done += len(chosen)
        if on_batch is not None:
            on_batch(done, len(rows))
    if total_tokens == 0:
        return LossResult(loss=math.nan, tokens=0)
    return LossResult(loss=total_nll / total_tokens, tokens=total_tokens)
