"""What `lorakit eval` measures: loss and perplexity on the trained tokens, exact match and token F1 on replies."""

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
