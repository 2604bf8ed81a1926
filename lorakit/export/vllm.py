"""vLLM: a merged folder it serves as is, or the run's adapter with the exact `vllm serve --enable-lora` line.

The merged folder is what `lorakit merge` writes (config, safetensors, tokenizer with the chat template of
training, generation_config.json listing every end-of-turn id, which vLLM stops on), checked by loading it back
with plain transformers. The adapter folder is the run's peft adapter with its tokenizer, chat template and a
generation_config.json, after the checks vLLM's LoRA loader would otherwise fail on at serve time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from lorakit.errors import LorakitError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                 "chat_template.jinja")
# --max-lora-rank values vLLM accepts; its default is 16.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_merged_folder(folder: Path, reference, placement) -> dict:
    """The folder loaded back with plain transformers, against the fine-tuned model's logits."""
    from lorakit.models.merge import TOLERANCES, compare_logits, load_plain, logits_of

    click.echo("  checking the folder, loaded back with plain transformers, against the fine-tuned model")
    model = load_plain(folder, placement)
    logits = [logits_of(model, ids) for ids in reference.sequences]
    del model
    figures = compare_logits(reference.logits, logits)
    relative, max_kl = TOLERANCES[placement.dtype]
    bound = relative * max(1.0, figures["max_abs_logit"])
    figures.update(positions=sum(len(s) for s in reference.sequences), conversations=len(reference.sequences),
                   tolerance={"max_abs_diff": bound, "relative_to_max_logit": relative, "mean_kl": max_kl},
                   dtype=placement.dtype)
    problems = []
    if figures["max_abs_diff"] > bound or figures["mean_kl"] > max_kl:
        problems.append(f"the merged folder's logits differ from the model's by up to {figures['max_abs_diff']:.3g} "
                        f"(mean KL {figures['mean_kl']:.3g}), beyond the {placement.dtype} bound {bound:.3g} / "
                        f"{max_kl:g}")
    figures.update(passed=not problems, problems=problems)
    click.echo(f"  merged folder vs the fine-tuned model: max |logit diff| {figures['max_abs_diff']:.3g}, mean KL "
               f"{figures['mean_kl']:.3g} (bound {bound:.3g} / {max_kl:g}): "
               + ("passed" if not problems else "FAILED"))
    return figures


def adapter_problems(config: dict) -> list[str]:
    """What in a peft adapter config vLLM's LoRA support refuses."""
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')}; vLLM serves LoRA adapters only")
    if config.get("use_dora"):
        problems.append("use_dora is set; vLLM does not serve DoRA adapters (export the merged folder instead)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save ({', '.join(config['modules_to_save'])}) are trained whole; vLLM's LoRA "
                        "loader does not take them (export the merged folder instead)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')}; vLLM's LoRA loader takes bias-free adapters")
    rank = max([config.get("r") or 0, *(config.get("rank_pattern") or {}).values()])
    if rank > VLLM_LORA_RANKS[-1]:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")
    return problems


def write_adapter_folder(run: Path, folder: Path, stops: list[int]) -> dict:
    """The run's adapter, tokenizer and chat template copied into `folder`, with a generation_config.json."""
    config = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    problems = adapter_problems(config)
    if problems:
        raise LorakitError(f"{run}: vLLM cannot serve this adapter: {'; '.join(problems)}; nothing was written")
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (run / name).is_file():
            shutil.copyfile(run / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}, indent=2) + "\n",
                                                   encoding="utf-8")
    rank = max([config.get("r") or 0, *(config.get("rank_pattern") or {}).values()])
    return {"rank": rank, "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= rank),
            "target_modules": config.get("target_modules")}


def serve_merged(folder: Path, name: str) -> str:
    return f"vllm serve {folder.resolve()} --served-model-name {name}"


def serve_adapter(base: str, written: Path, folder: Path, name: str, max_lora_rank: int) -> str:
    """The serve line for `folder` (its files are in `written` until the export is put in place): the base, the
    adapter under NAME, the rank, and the run's chat template and stop tokens."""
    parts = [f"vllm serve {base} --enable-lora --lora-modules {name}={folder.resolve()}"]
    if max_lora_rank > 16:
        parts.append(f"--max-lora-rank {max_lora_rank}")
    if (written / "chat_template.jinja").is_file():
        parts.append(f"--chat-template {(folder / 'chat_template.jinja').resolve()}")
    parts.append(f"--generation-config {folder.resolve()}")
    return " ".join(parts)
