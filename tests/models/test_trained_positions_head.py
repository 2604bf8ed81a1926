"""The CPU LM head that scores only trained positions gives what trl's fused head gives, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.models.trained_positions_head import score_positions, trained_positions_forward, wraps_cleanly

EVERY_OUTPUT = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def batch(vocab: int) -> dict:
    """Two padded rows whose prompts and padding are not trained (label -100), as sft and dpo batches come."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(2, vocab, (2, 48), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.clone()
    labels[:, :20] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trl_and_ours(folder):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = copy.deepcopy(theirs)
    add_fused_lm_head(theirs, outputs=("log_probs", *EVERY_OUTPUT))
    add_fused_lm_head(ours, outputs=("log_probs", *EVERY_OUTPUT))
    assert wraps_cleanly(ours)
    ours.forward = trained_positions_forward(ours.forward, EVERY_OUTPUT, type(ours).forward).__get__(ours)
    return theirs, ours


@pytest.mark.parametrize("items", [None, 50])
def test_same_log_probs_statistics_loss_and_gradients_as_trls_head(tiny_llama, items):
    theirs, ours = trl_and_ours(tiny_llama)
    inputs = batch(theirs.config.vocab_size)
    expected = theirs(**inputs, fused_lm_head=True, num_items_in_batch=items)
    got = ours(**inputs, fused_lm_head=True, num_items_in_batch=items)
    assert torch.equal(got.label_mask, expected.label_mask)
    assert got.log_probs.shape == expected.log_probs.shape == (2, 47)
    assert torch.allclose(got.log_probs, expected.log_probs, atol=1e-5)
    assert got.log_probs[~got.label_mask].abs().max() == 0  # zero where not trained, as trl's
    for name in ("entropy", "log_sum_sq_probs"):
        assert torch.allclose(getattr(got, name), getattr(expected, name), atol=1e-5), name
    trained = got.label_mask
    assert torch.allclose(got.mean_logits[trained], expected.mean_logits[trained], atol=1e-5)
    assert torch.equal(got.is_top1, expected.is_top1)
    assert got.loss.item() == pytest.approx(expected.loss.item(), abs=1e-6)
    expected.loss.backward()
    got.loss.backward()
    for (name, mine), trls in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(mine.grad, trls.grad, atol=1e-6), name


def test_a_batch_with_nothing_trained_is_a_differentiable_zero(tiny_llama):
    _, ours = trl_and_ours(tiny_llama)
    inputs = batch(ours.config.vocab_size)
    inputs["labels"][:] = -100
    out = ours(**inputs, fused_lm_head=True)
    assert out.loss.item() == 0
    out.loss.backward()  # no error: the zero is connected to the model
    assert out.entropy.shape == out.is_top1.shape == (2, 47)


def test_without_the_fused_flag_the_model_is_unchanged(tiny_llama):
    theirs, ours = trl_and_ours(tiny_llama)
    inputs = batch(theirs.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)
        generated = ours.generate(inputs["input_ids"][:1, :10], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, theirs.generate(inputs["input_ids"][:1, :10], max_new_tokens=4,
                                                      do_sample=False))


def test_bfloat16_weights_score_in_float32():
    """As trl's head: the projection in the weights' dtype, the log-softmax over it in float32."""
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(1, 6, 16, dtype=torch.bfloat16)
    labels = torch.tensor([[-100, 3, 7, 39, -100, 0]])
    out = score_positions(head, hidden, labels, ("entropy", "is_top1"), None)
    logits = head(hidden)
    picked = torch.log_softmax(logits.float(), -1)[0, [1, 2, 3, 5], [3, 7, 39, 0]]
    in_bfloat16 = torch.log_softmax(logits, -1)[0, [1, 2, 3, 5], [3, 7, 39, 0]].float()
    assert out.log_probs.dtype == torch.float32
    assert torch.allclose(out.log_probs[0, [1, 2, 3, 5]], picked, atol=1e-6)
    assert not torch.allclose(in_bfloat16, picked, atol=1e-6)


def test_a_head_in_another_dtype_than_the_hidden_states_projects_in_theirs():
    """A QLoRA base keeps its head in the load dtype while the hidden states leave the float32 norm: trl's head
    projects in the hidden states' dtype, and so does this one."""
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(1, 5, 16)
    labels = torch.tensor([[2, -100, 7, 39, 0]])
    out = score_positions(head, hidden, labels, ("entropy", "is_top1"), None)
    reference = torch.log_softmax(hidden @ head.weight.float().t(), -1)[0, [0, 2, 3, 4], [2, 7, 39, 0]]
    assert torch.allclose(out.log_probs[0, [0, 2, 3, 4]], reference, atol=1e-6)


def test_models_that_transform_their_logits_keep_trls_head(tiny_llama):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert not wraps_cleanly(model)  # trl's head not installed: nothing to wrap
    add_fused_lm_head(model)
    model.config.final_logit_softcapping = 30.0  # Gemma 2 caps its logits: trl's head applies it, this one would not
    assert not wraps_cleanly(model)


def test_sft_trainer_trains_and_logs_through_it(tiny_llama, tmp_path):
    """Rows of input_ids and labels, as lorakit hands them to SFTTrainer: training runs through the wrapped head,
    and SFTTrainer's own metrics (entropy, token accuracy) come from it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from lorakit.models.trained_positions_head import score_trained_positions_only

    rows = [{"input_ids": list(range(5, 25)), "labels": [-100] * 8 + list(range(13, 25))}] * 8
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                     report_to=[], logging_steps=1, learning_rate=1e-3)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args,
                         train_dataset=Dataset.from_list(rows),
                         peft_config=LoraConfig(r=4, target_modules="all-linear"))
    assert len(score_trained_positions_only(trainer, outputs=("entropy", "is_top1"))) == 1
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "entropy" in entry]
    assert len(logged) == 2
    assert all(0 < entry["entropy"] <= 10 and 0 <= entry["mean_token_accuracy"] <= 1 for entry in logged)
