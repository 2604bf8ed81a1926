"""--adapter-only: keep the base separate. A LoRA GGUF for llama.cpp (`--lora`), or the adapter folder for vLLM.

A LoRA GGUF holds each adapted matrix's two factors; llama.cpp applies them with scale lora_alpha / rank. It is
checked against the run's adapter module by module: every adapted module is there, with its rank, and the update
it makes (scale * B @ A) has the same size (Frobenius norm, which the converter's row permutation of attention
weights leaves unchanged). transformers cannot run a LoRA GGUF, so it is not run here.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import click

from lorakit.errors import LorakitError
from lorakit.export import converter

# Relative difference allowed between the norms of each module's update, by GGUF type of the factors.
NORM_TOLERANCES = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2}


def export_adapter(name: str, to: str, partial: Path, out: Path, quant: str | None, llama_cpp: Path | None,
                   verify: bool) -> dict:
    from lorakit.export.vocabulary import stop_tokens
    from lorakit.models.inference import resolve_target
    from lorakit.models.loading import load_tokenizer

    target = resolve_target(name)
    if target.kind != "adapter":
        raise LorakitError(f"--adapter-only needs a run folder (an adapter); {name} is a model folder")
    run = target.adapter_path
    base = target.model_section["name_or_path"]
    tokenizer, _ = load_tokenizer({"name_or_path": target.tokenizer_path})
    stops = stop_tokens(tokenizer, run)
    record = {"format": to, "adapter_only": True,
              "source": {"path": str(run.resolve()), "kind": "run", "base_model": base,
                         "trained_with_quantization": target.quantization},
              "stop_tokens": [{"id": i, "text": tokenizer.decode([i], skip_special_tokens=False)} for i in stops]}
    if to == "vllm":
        from lorakit.export import vllm

        facts = vllm.write_adapter_folder(run, partial, stops)
        same = all(digest(run / path.name) == digest(path) for path in partial.iterdir()
                   if path.name != "generation_config.json")
        record.update(vllm=facts, commands=[vllm.serve_adapter(base, partial, out, out.name, facts["max_lora_rank"])])
        if not verify:
            record.update(verified=None, check=None, note="not verified: exported with --no-verify")
            return record
        record.update(verified=same, problems=[] if same else ["a copied file differs from the run's"],
                      check={"passed": same, "files_identical_to_the_run": same, "served_by_vllm": False,
                             "vllm_lora_constraints": "hold (peft LoRA, no DoRA, no modules_to_save, bias none, "
                                                      f"rank {facts['rank']})"})
        return record
    if quant not in converter.CONVERTER_TYPES:
        raise LorakitError(f"--quant {quant}: a LoRA GGUF is written by the converter itself; choose one of "
                           f"{', '.join(converter.CONVERTER_TYPES)}")
    config = json.loads((run / "adapter_config.json").read_text(encoding="utf-8"))
    staging = partial / ".adapter"
    write_staging_adapter(run, config, staging)
    stem = run.resolve().name
    file = partial / f"{stem}-lora-{quant}.gguf"
    where = ["--base", str(Path(base).resolve())] if Path(base).is_dir() else ["--base-model-id", base]
    from lorakit.export.gguf import gguf_metadata

    click.echo(f"  converting the adapter with llama.cpp's {converter.LORA_CONVERTER} to {quant}")
    converter.run_converter(llama_cpp, converter.LORA_CONVERTER,
                            [str(staging), "--outfile", str(file), "--outtype", quant, *where],
                            {"metadata": gguf_metadata(f"{stem}-lora", base)}, partial)
    for path in staging.iterdir():
        path.unlink()
    staging.rmdir()
    record["gguf"] = {"file": file.name, "type": quant, "bytes": file.stat().st_size, "converter": str(llama_cpp)}
    record["commands"] = [f"llama-cli -m BASE.gguf --lora {out.resolve() / file.name} -cnv   # BASE.gguf: "
                          f"{base} converted with `lorakit export` or llama.cpp"]
    if not verify:
        record.update(verified=None, check=None, note="not verified: exported with --no-verify")
        return record
    check = check_lora_gguf(file, run, config, quant)
    record.update(verified=check["passed"], check=check, problems=check["problems"])
    return record


def write_staging_adapter(run: Path, config: dict, staging: Path) -> None:
    """The adapter as llama.cpp's converter reads it: no README to mine for metadata, scaling in alpha / rank."""
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise LorakitError(f"{run}: only plain LoRA adapters convert to a LoRA GGUF (not DoRA or other peft "
                           "types); export the merged model instead")
    if config.get("modules_to_save"):
        raise LorakitError(f"{run}: the adapter trains whole modules ({', '.join(config['modules_to_save'])}), "
                           "which a LoRA GGUF cannot hold; export the merged model instead")
    if config.get("alpha_pattern"):
        raise LorakitError(f"{run}: alpha_pattern gives modules their own lora_alpha; llama.cpp applies one alpha "
                           "to every module, so export the merged model instead")
    staging.mkdir(parents=True)
    settings = dict(config)
    if settings.get("use_rslora"):  # peft scales by alpha / sqrt(r); llama.cpp by alpha / r
        settings["lora_alpha"] = settings["lora_alpha"] * math.sqrt(settings["r"])
        settings["use_rslora"] = False
    (staging / "adapter_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (staging / "adapter_model.safetensors").symlink_to((run / "adapter_model.safetensors").resolve())


def check_lora_gguf(file: Path, run: Path, config: dict, quant: str) -> dict:
    """Each adapted module's update size in the GGUF (alpha / rank * B @ A) against the run's adapter."""
    import gguf
    import torch
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(str(file))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for tensor in reader.tensors:
        stem, _, part = tensor.name.rpartition(".")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        factors.setdefault(stem, {})[part] = torch.from_numpy(values.astype("float32")).reshape(
            [int(n) for n in reversed(tensor.shape)])
    exported = sorted(norm_of(f["lora_b"], f["lora_a"], alpha) for f in factors.values())
    weights = load_file(str(run / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    trained = []
    for key, a in weights.items():
        if ".lora_A." in key:
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            rank = a.shape[0]
            module_scale = scale if not config.get("rank_pattern") else config["lora_alpha"] / rank
            trained.append(float((b.float() @ a.float()).norm()) * module_scale)
    trained.sort()
    tolerance = NORM_TOLERANCES[quant]
    problems = []
    if len(exported) != len(trained):
        problems.append(f"the LoRA GGUF holds {len(exported)} adapted modules, the run's adapter {len(trained)}")
    worst = max((abs(x - y) / max(y, 1e-12) for x, y in zip(exported, trained)), default=0.0)
    if worst > tolerance:
        problems.append(f"an adapted module's update differs in size by {worst:.3g} (relative), beyond {tolerance:g}")
    figures = {"modules": len(exported), "modules_in_run": len(trained), "lora_alpha_in_gguf": alpha,
               "max_relative_norm_difference": worst, "tolerance": tolerance, "run_by_llama_cpp": False,
               "passed": not problems, "problems": problems}
    click.echo(f"  LoRA GGUF vs the run's adapter: {len(exported)} of {len(trained)} modules, update sizes within "
               f"{worst:.2g} (bound {tolerance:g}): " + ("passed" if not problems else "FAILED"))
    return figures


def norm_of(b, a, alpha: float) -> float:
    rank = a.shape[0] if a.shape[0] <= a.shape[1] else a.shape[1]
    product = b @ a if b.shape[-1] == a.shape[0] else a.T @ b.T  # token_embd's factors are stored transposed
    return float(product.norm()) * alpha / rank


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
