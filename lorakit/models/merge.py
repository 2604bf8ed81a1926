"""Merging a run's LoRA adapter into its base model: a standalone model folder, checked by its logits.

The base is loaded in 16/32-bit, also for a QLoRA run: merging into 4-bit weights would round the update into the
4-bit grid, the known cause of merged QLoRA models losing quality. A QLoRA adapter goes by default into the
dequantized 4-bit weights it was trained against, or with --into original into the unrounded ones
(lorakit.models.quantized_base; docs/merge.md has the measurement). Every merge then checks itself: the folder it
wrote is loaded back with plain transformers and its logits are compared with base + adapter on fixed prompts.
The folder is written under a temporary name beside the destination and renamed into place only once the check
passes, so a failed or interrupted merge leaves nothing half-written.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from lorakit.errors import LorakitError, MergeCheckError, OutputDirError
from lorakit.models.classifier import (TASK_FILE, check_text_ids, classifier_skeleton, head_kwargs,
                                       load_classifier_tokenizer, read_task)

# Conversations the check runs through the chat template: short, varied, and independent of the run's data.
CHECK_PROMPTS = [
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a Python function that returns the sum of a list of numbers."}],
    [{"role": "user", "content": "Summarise in one sentence: the cat sat on the mat and looked at the dog."}],
    [{"role": "user", "content": "Translate to German: good morning, how are you today?"}],
    [{"role": "user", "content": "List three prime numbers greater than 10."}],
]
# Merged and unmerged models compute the same function with different rounding: (W + sBA)x rounds the sum into
# the weights' dtype, Wx + sB(Ax) does not, so logits may differ by that rounding. The logit bound is relative to
# the largest logit, as rounding error grows with the values rounded. Measured on a 4-layer, 256-wide Llama with a
# rank-16 adapter on every linear layer (max |logit diff| / mean KL, largest logit 7.6): float32 2.9e-5 / 4e-8,
# float16 0.039 / 2e-5, bfloat16 0.32 / 1.3e-3; each bound leaves a margin of 4x or more. Leaving that adapter out
# entirely gave 1.7 / 0.031 and leaving out one of its 28 modules 0.067 / 3.6e-5: float32 catches both, bfloat16
# only the first. So the check also measures the adapter's own effect, and says when rounding could hide part of it.
TOLERANCES = {  # dtype -> (max |logit difference| as a fraction of max |logit|, mean KL divergence in nats)
    "float32": (1e-4, 1e-6),
    "float16": (2e-2, 1e-3),
    "bfloat16": (2e-1, 1e-2),
}
MAX_SHARD_SIZE = "5GB"
MERGE_RECORD = "lorakit_merge.json"


def merge_run(run_dir: str | os.PathLike, *, output: str | os.PathLike | None = None, base: str | None = None,
              dtype: str = "auto", device: str = "cpu", into: str | None = None) -> Path:
    from lorakit.models.inference import resolve_target
    from lorakit.models.loading import quiet_upstream_logs
    from lorakit.models.quantized_base import choose_into
    from lorakit.training.folder_lock import hold_lock

    quiet_upstream_logs()
    run = Path(run_dir)
    if not run.is_dir():
        raise LorakitError(f"{run_dir}: no such run folder")
    if not (run / "adapter_config.json").is_file():
        raise LorakitError(f"{run_dir} holds no adapter_config.json: not a finished lorakit run (or peft adapter) "
                           "folder, so there is nothing to merge")
    out = Path(output) if output else run.parent / f"{run.resolve().name}-merged"
    check_output_folder(out)
    target = resolve_target(str(run))
    if read_task(run) and into == "dequantized":  # load_dequantized_base builds causal LMs only
        raise LorakitError("--into dequantized: not for a classify run; merge it with --into original (its default)")
    into = choose_into(into, None if read_task(run) else target.quantization)
    with hold_lock(out, "lorakit merge"):  # a second merge into the same folder is refused, not interleaved
        check_output_folder(out)  # again, now that no one else can be writing it
        return merge_locked(run, out, target, base, dtype, device, into)


def merge_locked(run: Path, out: Path, target, base: str | None, dtype: str, device: str, into: str) -> Path:
    from lorakit.models.loading import load_tokenizer

    section = dict(target.model_section)
    if base:
        local = Path(base).expanduser()
        section = {**section, "name_or_path": str(local.resolve()) if local.exists() else base, "revision": None}

    click.echo(f"lorakit merge: {run} into {section['name_or_path']}")
    base_config = load_config(section)
    task = read_task(run)  # a `lorakit classify` run: the base takes the run's head, as a sequence classifier
    # The tokenizer the run shipped (chat template and end-of-turn EOS included) is the merged model's tokenizer.
    saved = {"name_or_path": target.tokenizer_path, "trust_remote_code": section.get("trust_remote_code", False)}
    tokenizer = load_classifier_tokenizer(saved) if task else load_tokenizer(saved)[0]
    check_adapter_fits(run, target, section, base_config, tokenizer)
    placement = merge_placement(dtype, device, base_config)
    click.echo(f"  loading the base on {placement.device} in {placement.dtype}"
               + {"original": " (not 4-bit: its original weights)" if target.quantization else "",
                  "dequantized": " (its 4-bit weights as training saw them, dequantized)"}[into])

    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    started = time.time()
    try:
        prompts = check_text_ids(tokenizer) if task else [chat_prompt(tokenizer, m) for m in CHECK_PROMPTS]
        quantization = target.quantization if into == "dequantized" else None
        merged, reference, base_logits = merge_in_memory(run, section, placement, prompts, quantization)
        write_model_folder(merged, tokenizer, partial)
        if task:  # its labels and columns, for lorakit eval and predict on the merged folder
            shutil.copy(run / TASK_FILE, partial / TASK_FILE)
        del merged
        gc.collect()

        click.echo("  checking the written folder against base + adapter")
        reloaded = load_plain(partial, placement)
        merged_logits = [logits_of(reloaded, ids) for ids in prompts]
        del reloaded
        gc.collect()
        check = check_merge(reference, merged_logits, base_logits, placement.dtype)
        if not check["passed"]:
            limits = check["tolerance"]
            raise MergeCheckError(
                f"the merged model disagrees with base + adapter beyond the {placement.dtype} tolerance "
                f"(max |logit diff| {check['max_abs_diff']:.3g} against {limits['max_abs_diff']:.3g}, mean KL "
                f"{check['mean_kl']:.3g} against {limits['mean_kl']:g}); nothing was written. Try --dtype float32, "
                "and check that --base is the model the run was trained on")

        training_check = None
        if target.quantization and target.quantization.get("load_in_4bit"):
            training_check = compare_with_training_model(target, section, device, prompts, merged_logits)

        record = merge_record(run, target, section, placement, check, training_check, time.time() - started)
        record["into"] = into
        (partial / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above; a folder cannot be renamed onto one that exists
        os.replace(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    click.echo(f"lorakit: merged model in {out} ({time.time() - started:.0f} s); load it with "
               f"{'AutoModelForSequenceClassification' if task else 'AutoModelForCausalLM'}"
               f".from_pretrained({str(out)!r})")
    return out


# ---------------------------------------------------------------- checks before any weight is loaded


def check_output_folder(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"--output {out} is a file; nothing was changed. Choose another --output")
    if any(out.iterdir()):
        raise OutputDirError(f"--output {out} already exists and is not empty; nothing was changed. "
                             "Choose another --output, or remove that folder first")


def load_config(section: dict) -> Any:
    """The base's config, or one line saying why it cannot be read (missing, offline)."""
    from transformers import AutoConfig

    name = section["name_or_path"]
    try:
        return AutoConfig.from_pretrained(name, revision=section.get("revision"),
                                          trust_remote_code=section.get("trust_remote_code", False))
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if os.environ.get("HF_HUB_OFFLINE") == "1" and not Path(name).exists():
            reason = "not a local folder, and the Hub is off (HF_HUB_OFFLINE=1) while it is not in the local cache"
        raise LorakitError(f"--base / model.name_or_path {name}: cannot be loaded: {reason}") from None


def check_adapter_fits(run: Path, target, section: dict, base_config, tokenizer) -> None:
    """Refuse a base the adapter was not trained on: architecture, adapted modules and their shapes, vocabulary.

    Checked on a meta-device model built from the config, so a mismatch is found before gigabytes are loaded.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    problems = []
    trained_on = target.model_section["name_or_path"]
    if section["name_or_path"] != trained_on:
        trained_type = recorded_model_type(target.model_section)
        if trained_type and trained_type != base_config.model_type:
            problems.append(f"architecture: the run was trained on {trained_on} ({trained_type}); "
                            f"{section['name_or_path']} is {base_config.model_type}")
    vocab = getattr(base_config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        problems.append(f"vocabulary: the run's tokenizer has {len(tokenizer)} tokens, the base's embeddings "
                        f"hold {vocab}")

    with torch.device("meta"):
        task, remote = read_task(run), section.get("trust_remote_code", False)
        skeleton = classifier_skeleton(base_config, task, remote) if task else \
            AutoModelForCausalLM.from_config(base_config, trust_remote_code=remote)
    modules = dict(skeleton.named_modules())
    parameters = dict(skeleton.named_parameters())
    weights = run / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                problem = check_adapter_tensor(key, handle.get_slice(key).get_shape(), modules, parameters)
                if problem:
                    problems.append(problem)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise LorakitError(f"the adapter in {run} does not fit the base {section['name_or_path']}; nothing was "
                           "written:\n  " + "\n  ".join(shown) +
                           "\nGive the model the run was trained on with --base")


def check_adapter_tensor(key: str, shape: list[int], modules: dict, parameters: dict) -> str | None:
    """What is wrong with one adapter tensor against the base's modules, or None."""
    name = key.removeprefix("base_model.model.")
    if ".lora_A." in name or ".lora_B." in name:
        module_name = name.split(".lora_")[0]
        module = modules.get(module_name)
        if module is None:
            return f"the adapter changes {module_name}, which the base does not have"
        fan_in, fan_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if fan_in is None or len(shape) != 2:
            return None  # not a linear layer: peft's own loading checks it
        if ".lora_A." in name and shape[1] != fan_in:
            return f"{module_name} takes {fan_in} inputs in the base, {shape[1]} in the adapter"
        if ".lora_B." in name and shape[0] != fan_out:
            return f"{module_name} gives {fan_out} outputs in the base, {shape[0]} in the adapter"
        return None
    # A whole trained module (modules_to_save, e.g. embeddings or lm_head resized for new tokens).
    parameter = parameters.get(name)
    if parameter is not None and list(parameter.shape) != list(shape):
        return f"{name} is {list(parameter.shape)} in the base, {list(shape)} in the adapter"
    return None


def recorded_model_type(model_section: dict) -> str | None:
    """The architecture of the model the run was trained on, when its config can still be read (local or cached)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_section["name_or_path"], revision=model_section.get("revision"),
                                            trust_remote_code=model_section.get("trust_remote_code", False))
    except (OSError, ValueError):
        return None
    return config.model_type


def merge_placement(dtype: str, device: str, base_config):
    """auto keeps the dtype the base checkpoint was published in (float32 when it does not say)."""
    from lorakit.models.loading import choose_placement

    if dtype == "auto":
        saved = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
        saved = str(saved).removeprefix("torch.") if saved is not None else "float32"
        dtype = saved if saved in TOLERANCES else "float32"
    return choose_placement({"dtype": dtype, "attn_implementation": "auto"}, device)


# ---------------------------------------------------------------- merging


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    from lorakit.models.inference import chat_prompt_ids

    return chat_prompt_ids(tokenizer, messages)


def merge_in_memory(run: Path, section: dict, placement, prompts: list[list[int]],
                    dequantize: dict | None = None) -> tuple[Any, list, list]:
    """(merged model, base + adapter logits, base logits on the prompts); one copy of the weights is ever held.
    `dequantize`: the run's quantization section, to merge into the dequantized 4-bit weights."""
    from lorakit.models.inference import attach_adapter
    from lorakit.models.loading import load_model
    from lorakit.models.quantized_base import load_dequantized_base

    if dequantize:
        base = load_dequantized_base(section, dequantize, placement)
    else:
        base = load_model(section, None, placement, **head_kwargs(read_task(run)))
    model = attach_adapter(base, run, section["name_or_path"])
    model.eval()
    reference = [logits_of(model, ids) for ids in prompts]
    with model.disable_adapter():
        base_logits = [logits_of(model, ids) for ids in prompts]
    click.echo("  merging")
    merged = model.merge_and_unload()  # in place: the LoRA weights are added into the base's and removed
    return merged, reference, base_logits


def write_model_folder(merged, tokenizer, folder: Path) -> None:
    """Sharded safetensors, config, generation config stopping at EOS and the end-of-turn token, tokenizer."""
    from lorakit.models.inference import stop_token_ids

    folder.mkdir(parents=True)
    generation = getattr(merged, "generation_config", None)  # a classifier has none: it does not generate
    if generation is not None:
        generation.eos_token_id = stop_token_ids(tokenizer, merged)
        generation.pad_token_id = tokenizer.pad_token_id
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(folder)


def load_plain(folder: Path, placement) -> Any:
    """The folder as any user would load it: plain transformers, no peft."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if read_task(folder) else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=placement.torch_dtype,
                                                 attn_implementation=placement.attn_implementation)
    return model.to(placement.device).eval()


def logits_of(model, ids: list[int]):
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        # [positions, vocabulary] of a causal LM; [1, labels] of a classifier
        return model(input_ids=torch.tensor([ids], device=device)).logits.flatten(0, -2).float().cpu()


def check_merge(reference: list, merged: list, base: list, dtype: str) -> dict:
    """The merged model's logits against base + adapter's, judged by the dtype's tolerance, and printed."""
    check = compare_logits(reference, merged)
    relative, max_kl = TOLERANCES[dtype]
    max_abs = relative * max(1.0, check["max_abs_logit"])
    check.update(dtype=dtype, prompts=len(reference), positions=sum(len(logits) for logits in reference),
                 tolerance={"max_abs_diff": max_abs, "relative_to_max_logit": relative, "mean_kl": max_kl})
    check["passed"] = check["max_abs_diff"] <= max_abs and check["mean_kl"] <= max_kl
    check["adapter_effect"] = compare_logits(reference, base)
    print_check("merged vs base + adapter", check)
    if check["passed"] and check["adapter_effect"]["mean_kl"] < 10 * max_kl:
        effect = check["adapter_effect"]["mean_kl"]
        click.echo(f"  note: the adapter moves the base's logits by a mean KL of {effect:.3g}, close to {dtype} "
                   "rounding, so this check cannot tell a partial merge from rounding; --dtype float32 checks it "
                   "sharply")
    return check


def compare_logits(reference: list, candidate: list) -> dict:
    """Max absolute logit difference and mean KL(reference || candidate) per position, over all prompts."""
    import torch

    max_abs, largest, kl_sum, positions = 0.0, 0.0, 0.0, 0
    for expected, actual in zip(reference, candidate):
        max_abs = max(max_abs, (expected - actual).abs().max().item())
        largest = max(largest, expected.abs().max().item())
        expected_log = torch.log_softmax(expected, dim=-1)
        actual_log = torch.log_softmax(actual, dim=-1)
        kl = (expected_log.exp() * (expected_log - actual_log)).sum(dim=-1)
        kl_sum += kl.clamp_min(0).sum().item()
        positions += expected.shape[0]
    agree = sum(int((e.argmax(-1) == a.argmax(-1)).sum()) for e, a in zip(reference, candidate))
    return {"max_abs_diff": max_abs, "mean_kl": kl_sum / max(positions, 1),
            "top1_agreement": agree / max(positions, 1), "max_abs_logit": largest}


def compare_with_training_model(target, section: dict, device: str, prompts: list, merged_logits: list) -> dict:
    """For information: how far the merged model is from the 4-bit base + adapter that training used.

    Merged --into dequantized, the two compute the same up to rounding; --into original removes the 4-bit rounding
    of the base weights, and differs more. Recorded, never a reason to fail.
    """
    from lorakit.models.inference import attach_adapter
    from lorakit.models.loading import choose_placement, load_model

    training_placement = choose_placement({**target.model_section, "device": device})
    try:
        base = load_model(section, target.quantization, training_placement,
                          **head_kwargs(read_task(target.adapter_path)))
        model = attach_adapter(base, target.adapter_path, section["name_or_path"])
        model.eval()
        training_logits = [logits_of(model, ids) for ids in prompts]
    except Exception as error:  # for information only, never a failed merge: bitsandbytes' assertions included
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        click.echo(f"  (not compared with the 4-bit training-time model: {message})")
        return {"measured": False, "reason": message}
    del model, base
    gc.collect()
    figures = compare_logits(training_logits, merged_logits)
    figures.update(measured=True, training_dtype=training_placement.dtype)
    print_check("merged vs the 4-bit model used in training (for information)", figures)
    return figures


# ---------------------------------------------------------------- record and output


def merge_record(run: Path, target, section: dict, placement, check: dict, training_check: dict | None,
                 seconds: float) -> dict:
    from lorakit.training.run_dir import library_versions

    return {
        "run_dir": str(run.resolve()),
        "base_model": {"name_or_path": section["name_or_path"], "revision": section.get("revision")},
        "trained_on": {"name_or_path": target.model_section["name_or_path"],
                       "revision": target.model_section.get("revision"), "quantization": target.quantization},
        "dtype": placement.dtype,
        "device": placement.device,
        "check": check,
        "vs_training_model": training_check,
        "seconds": round(seconds, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
    }


def print_check(title: str, figures: dict) -> None:
    verdict = ""
    if "passed" in figures:
        limits = figures["tolerance"]
        verdict = (f"  (limits {limits['max_abs_diff']:.3g} / {limits['mean_kl']:g} for {figures['dtype']}: "
                   + ("passed)" if figures["passed"] else "FAILED)"))
    click.echo(f"  {title}: max |logit diff| {figures['max_abs_diff']:.3g}, mean KL {figures['mean_kl']:.3g}, "
               f"top-1 agreement {figures['top1_agreement']:.1%}{verdict}")
