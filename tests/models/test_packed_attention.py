"""Per-document attention for packed rows on a CPU: the same numbers as each document run alone."""

from __future__ import annotations

import pytest
import torch

from lorakit.models import packed_attention

LENGTHS = [37, 120, 8, 200, 90, 57]


def packed_inputs(vocab: int) -> dict:
    """One packed row of six documents, as trl's padding-free collator hands it to the model."""
    ids = torch.randint(2, vocab, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    bounds = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "use_cache": False,
            "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(LENGTHS),
            "max_length_k": max(LENGTHS)}


def load(folder, attention: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32)


def test_a_packed_row_equals_its_documents_run_alone_and_sdpa_over_the_masked_row(tiny_llama):
    name = packed_attention.register()
    per_document, masked = load(tiny_llama, name), load(tiny_llama, "sdpa")
    inputs = packed_inputs(per_document.config.vocab_size)
    out = per_document(**inputs)
    out.loss.backward()
    reference = masked(**inputs)  # transformers' block-diagonal mask over the whole row
    reference.loss.backward()
    bounds = inputs["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        alone = torch.cat([masked(input_ids=inputs["input_ids"][:, start:end]).logits
                           for start, end in zip(bounds[:-1], bounds[1:])], dim=1)
    assert (out.logits - alone).abs().max() < 1e-5
    assert (out.logits - reference.logits).abs().max() < 1e-5
    assert out.loss.item() == pytest.approx(reference.loss.item(), abs=1e-6)
    for ours, theirs in zip(per_document.parameters(), masked.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-6)


def test_without_document_bounds_it_is_sdpa_with_its_mask(tiny_llama):
    name = packed_attention.register()
    per_document, plain = load(tiny_llama, name), load(tiny_llama, "sdpa")
    ids = torch.randint(2, plain.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0  # a padded batch, as evaluation and generation give it
    with torch.no_grad():
        assert torch.equal(per_document(input_ids=ids, attention_mask=mask).logits,
                           plain(input_ids=ids, attention_mask=mask).logits)
        generated = per_document.generate(ids[:1, :10], max_new_tokens=5, do_sample=False)
        assert torch.equal(generated, plain.generate(ids[:1, :10], max_new_tokens=5, do_sample=False))


def test_it_is_chosen_only_for_packing_on_a_cpu_with_sdpa():
    from lorakit.models.loading import Placement

    cpu = Placement(device="cpu", dtype="float32", attn_implementation="sdpa", device_name="CPU")
    assert packed_attention.use_per_document_attention(True, cpu)
    assert not packed_attention.use_per_document_attention(None, cpu)  # packing off (the CPU default)
    gpu = Placement(device="cuda", dtype="bfloat16", attn_implementation="sdpa", device_name="GPU")
    assert not packed_attention.use_per_document_attention(True, gpu)
    eager = Placement(device="cpu", dtype="float32", attn_implementation="eager", device_name="CPU")
    assert not packed_attention.use_per_document_attention(True, eager)
