"""Attention for packed rows where no variable-length kernel exists (the CPU): one causal pass per document.

trl's padding-free packing flattens a micro-batch into one row of several documents and hands the model their
boundaries (`cu_seq_lens_q`), which flash attention's variable-length kernels use to attend within each document
only. SDPA has no such kernel: given the row, transformers builds a block-diagonal mask of the whole row and SDPA
computes every query against every key of it, quadratic in the row's length, most of it masked away. This
attention runs PyTorch's own SDPA once per document instead, causal and unmasked (its fastest path), so the work
is that of the documents alone. Anything else (no boundaries: padded batches, evaluation, generation; a sliding
window; a batch of several rows) goes to transformers' SDPA unchanged, with the mask transformers built for it.
"""

from __future__ import annotations

from typing import Any

NAME = "lorakit_packed_sdpa"


def use_per_document_attention(packing: bool | None, placement) -> bool:
    """Packing asked for, on a CPU, with SDPA: measured faster there than SDPA over the whole masked row
    (docs/benchmarks.md); elsewhere flash attention's own kernels, or packing off, decide."""
    return bool(packing) and placement.device == "cpu" and placement.attn_implementation == "sdpa"


def packed_sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> tuple:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    if (bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or getattr(module, "sliding_window", None) or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    edges = bounds.tolist()
    if edges[0] != 0 or edges[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    lengths = [end - start for start, end in zip(edges[:-1], edges[1:])]
    # One split per tensor, not a slice per document: a slice's backward writes its gradient into a zeroed tensor
    # of the whole row, and those are summed, once per document; a split's backward is one concatenation.
    documents = zip(*(tensor.split(lengths, dim=2) for tensor in (query, key, value)), lengths)
    pieces = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0] for q, k, v, length in documents if length]
    return torch.cat(pieces, dim=1), None  # [batch, tokens, heads, head_dim], as sdpa_attention_forward returns


def register() -> str:
    """Make NAME an attn_implementation transformers knows (with SDPA's masks for what is not packed)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
