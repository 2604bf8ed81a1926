#!/usr/bin/env python
"""lorakit on one GPU: a Llama-3.1-8B-shaped model, LoRA and QLoRA, against plain trl; writes a JSON and a table.

    bash benchmarks/gpu.sh                    # on an H100/H200: installs the carried wheels, then runs this
    python benchmarks/gpu.py --out results    # the same without the install step
    python benchmarks/gpu.py --shape tiny --steps 4 --out /tmp/dry    # the same code path on a CPU, in seconds

The model is built from Llama-3.1-8B's configuration with random weights (the GPU machine downloads nothing),
on the GPU in bfloat16, and saved once as a safetensors folder every variant loads. Data: chat rows of
long-tailed lengths (benchmarks/bench_sft.py), packed into sequences of 2,048 tokens. Each variant runs in its own
process, so its peak memory is its own, and in this order, most important first, within a time budget
(`--budget`, default 420 s of the 8 minutes; a variant that would start after it is recorded as skipped):

    lora          lorakit sft, LoRA r 16 on every linear layer, bf16, packed, micro-batch 2 x 2048, no checkpointing
    lora-trl      plain trl (SFTTrainer + peft, the script a user writes) on exactly those settings
    qlora         lorakit sft, QLoRA NF4 (double quantization), micro-batch 2 x 2048, lorakit's GPU defaults
    lora-liger    lora with training.use_liger_kernel
    lora-other-attention  lora with the attention lorakit did not pick (sdpa <-> flash_attention_2)
    lora-compile  lora with training.torch_compile

Measured per variant, over the steps after `--warmup`: tokens/s (every token of the packed rows), peak memory
(torch.cuda.max_memory_allocated and _reserved; peak RSS on a CPU), MFU, and lorakit validate's memory estimate
for the same recipe against the measured peak.

MFU = model FLOPs per second / the chip's dense bf16 peak (H100/H200 SXM 989 TFLOPS). Model FLOPs of a token
at position p of its document (p = 0, 1, ...), summed over the measured tokens:
    4 N_frozen            forward (2 N) and input-gradient (2 N) passes of the frozen base's matmuls (all linear
                          layers and the LM head; no weight gradients are computed for them);
    + 6 N_lora            forward, input- and weight-gradient passes of the adapters;
    + 12 (p + 1) d_attn L attention: QK^T and AV forward (4 (p + 1) d_attn per layer) and twice that backward,
                          over its own document only (packing is padding-free), for L layers;
recomputation (activation checkpointing) is not counted, as is usual for MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_sft

SHAPES = {
    # Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json), less rope scaling, which does not change the cost.
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
    # The same architecture at test size, for the CPU dry run.
    "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "rms_norm_eps": 1e-5, "rope_theta": 500000.0},
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}
VARIANTS = ("lora", "lora-trl", "qlora", "lora-liger", "lora-other-attention", "lora-compile")
SEQ = 2048
MICRO_BATCH = 2


# ---------------------------------------------------------------- setup (driver)


def build_base(folder: Path, shape: str, device: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bench_sft.build_tokenizer(folder)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # random init where it is fast: 8 B parameters on the GPU take seconds
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model


def attention_choice() -> str:
    from lorakit.models.loading import choose_attention

    return choose_attention("auto", "cuda" if cuda() else "cpu")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- one variant (worker process)


class Meter:
    """Counts tokens and document positions of every micro-batch, and times the optimizer steps."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.step_ends: list[float] = []
        self.batches: list[tuple[int, int]] = []  # (tokens, sum of (position + 1)) per micro-batch
        self.after_training_error: str | None = None

    def count(self, inputs) -> None:
        positions = inputs.get("position_ids")
        if positions is None:  # padded rows: positions from the mask
            mask = inputs["attention_mask"]
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, -1)
        self.batches.append((int((positions >= 0).sum()), int((positions + 1).clamp(min=0).sum())))

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if cuda():
                    import torch

                    torch.cuda.synchronize()
                meter.step_ends.append(time.perf_counter())

        return StepClock()

    def measured(self, accumulation: int) -> dict:
        first = self.warmup  # steps 0..warmup-1 warm up (allocator, kernels, compilation)
        window = self.batches[first * accumulation:len(self.step_ends) * accumulation]
        seconds = self.step_ends[-1] - self.step_ends[first - 1]
        tokens = sum(t for t, _ in window)
        return {"measured_steps": len(self.step_ends) - first, "tokens": tokens, "seconds": seconds,
                "tokens_per_s": tokens / seconds, "position_sum": sum(p for _, p in window)}


def recipe_text(args, variant: str, model: Path, data: Path, out: Path) -> str:
    attention = attention_choice()
    if variant == "lora-other-attention":
        attention = "sdpa" if attention != "sdpa" else "flash_attention_2"
    quantization = ("quantization: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true}\n"
                    if variant == "qlora" else "")
    extra = {"lora-liger": "use_liger_kernel: true, ", "lora-compile": "torch_compile: true, "}.get(variant, "")
    # LoRA: no checkpointing (the 8B model's activations at 2 x 2048 fit an 80 GiB card); QLoRA: lorakit's default.
    checkpointing = "" if variant == "qlora" else "activation_checkpointing: false, "
    dtype = "bfloat16" if cuda() else "float32"
    return (f"model: {{name_or_path: {model}, dtype: {dtype}, attn_implementation: {attention}}}\n{quantization}"
            "lora: {r: 16, lora_alpha: 32, lora_dropout: 0.0, target_modules: all-linear}\n"
            f"data: {{train: [{data}], max_length: {args.seq}}}\n"
            f"training: {{output_dir: {out}, max_steps: {args.steps}, per_device_train_batch_size: {args.batch}, "
            f"learning_rate: 2.0e-4, logging_steps: 1, save_strategy: 'no', seed: 0, packing: true, {checkpointing}"
            f"{extra}report_to: none}}\n")


def run_lorakit(args, variant: str, work: Path, meter: Meter):
    from trl import SFTTrainer

    from lorakit.commands import sft
    from lorakit.training import lifecycle

    recipe = work / f"{variant}.yaml"
    recipe.write_text(recipe_text(args, variant, work / "model", work / "data.jsonl", work / f"out-{variant}"))
    captured = {}
    train = SFTTrainer.train

    def counting_train(self, *a, **k):
        captured["trainer"] = self
        step = self.training_step
        self.training_step = lambda model, inputs, *more, **kw: (meter.count(inputs), step(model, inputs, *more, **kw))[1]
        return train(self, *a, **k)

    SFTTrainer.train = counting_train
    try:
        lifecycle.run_recipe("sft", recipe, (), sft.build_sft, overwrite=True, callbacks=(meter.callback(),))
    except Exception as error:
        trainer = captured.get("trainer")
        if trainer is None or trainer.state.global_step < args.steps:
            raise
        # Training is measured; what failed came after it (the saved outputs' extras, say): report it, keep the figures.
        meter.after_training_error = f"{type(error).__name__}: {str(error).strip()[:300]}"
    finally:
        SFTTrainer.train = train
    return captured["trainer"], recipe


def run_plain_trl(args, work: Path, meter: Meter):
    """The script a user writes with trl alone, on the lora variant's settings."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model_dir = work / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda() else torch.float32,
                                                 attn_implementation=attention_choice())
    config = SFTConfig(output_dir=str(work / "out-lora-trl"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=2e-4, max_length=args.seq, packing=True, assistant_only_loss=True,
                       bf16=cuda(), gradient_checkpointing=False, logging_steps=1, save_strategy="no",
                       report_to="none", seed=0, use_cpu=not cuda())
    trainer = SFTTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=load_dataset("json", data_files=str(work / "data.jsonl"), split="train"),
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                task_type="CAUSAL_LM"), callbacks=[meter.callback()])
    step = trainer.training_step
    trainer.training_step = lambda model, inputs, *more, **kw: (meter.count(inputs), step(model, inputs, *more, **kw))[1]
    trainer.train()
    return trainer


def worker(args) -> dict:
    import torch

    work = Path(args.workdir)
    meter = Meter(args.warmup)
    recipe = None
    if args.worker == "lora-trl":
        trainer = run_plain_trl(args, work, meter)
    else:
        trainer, recipe = run_lorakit(args, args.worker, work, meter)
    result = meter.measured(trainer.args.gradient_accumulation_steps)
    model = trainer.model
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    config = model.config
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    frozen = frozen_matmul_params(model)
    flops = (4 * frozen + 6 * lora) * result["tokens"] + \
        12 * head_dim * text.num_attention_heads * text.num_hidden_layers * result["position_sum"]
    if meter.after_training_error:
        result["after_training_error"] = meter.after_training_error
    result.update(frozen_matmul_params=frozen, lora_params=lora, model_flops=flops,
                  attn_implementation=getattr(config, "_attn_implementation", None),
                  final_loss=next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None))
    if cuda():
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        free, total = torch.cuda.mem_get_info()
        result.update(device=name, peak_allocated=torch.cuda.max_memory_allocated(),
                      peak_reserved=torch.cuda.max_memory_reserved(),
                      outside_allocator=(total - free) - torch.cuda.memory_reserved(),
                      mfu=flops / result["seconds"] / (peak * 1e12) if peak else None)
        result["measured_peak"] = result["peak_reserved"] + result["outside_allocator"]
    else:
        result.update(device="cpu", peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        result["measured_peak"] = result["peak_rss"]  # the CPU estimate covers the whole process
    if recipe is not None:
        result["estimate"] = memory_estimate(recipe, work / "model")
    return result


def frozen_matmul_params(model) -> int:
    """Weights of the frozen base's linear layers and LM head (4-bit weights count as the values they hold)."""
    import torch

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            total += module.in_features * module.out_features
    return total


def memory_estimate(recipe: Path, model_dir: Path) -> int:
    from transformers import AutoConfig

    from lorakit.recipe.load import load_recipe
    from lorakit.training.memory import estimate_recipe_memory

    estimate, _ = estimate_recipe_memory(load_recipe(recipe, (), command="sft"), AutoConfig.from_pretrained(model_dir),
                                         device="cuda" if cuda() else "cpu")
    return estimate.total


# ---------------------------------------------------------------- driver


def run_variant(args, variant: str, work: Path, timeout: float) -> dict:
    from peers import first_error

    command = [sys.executable, __file__, "--worker", variant, "--workdir", str(work), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--seq", str(args.seq), "--batch", str(args.batch)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LORAKIT_CACHE": str(work / "cache"), "HF_HOME": str(work / "hf-home")}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(1, timeout), check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (the time budget)"}
    (work / f"{variant}.log").write_text(done.stdout + done.stderr)
    line = next((text for text in done.stdout.splitlines() if text.startswith("GPU_RESULT ")), None)
    if done.returncode != 0 or line is None:
        return {"error": first_error(done.stderr) or f"exit {done.returncode}", "wall_s": time.perf_counter() - started}
    return {**json.loads(line[len("GPU_RESULT "):]), "wall_s": time.perf_counter() - started}


def table(results: dict) -> str:
    reference = results.get("lora-trl", {}).get("tokens_per_s")
    gib = 2**30
    lines = [("| variant | attention | tokens/s | x plain trl | MFU | peak allocated GiB | peak reserved GiB | "
              "estimate GiB (measured / estimate) | final loss |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | failed: `{r['error']}` | | | | | | |")
            continue
        cells = [name, r["attn_implementation"], f"{r['tokens_per_s']:,.0f}",
                 f"{r['tokens_per_s'] / reference:.2f}x" if reference else "",
                 f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""]
        if "peak_allocated" in r:
            cells += [f"{r['peak_allocated'] / gib:.2f}", f"{r['peak_reserved'] / gib:.2f}"]
        else:
            cells += [f"RSS {r['peak_rss'] / gib:.2f}", ""]
        peak, estimate = r.get("measured_peak"), r.get("estimate")
        cells.append(f"{estimate / gib:.2f} ({peak / estimate:.2f})" if estimate and peak else "")
        cells.append(f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--seq", type=int, default=SEQ)
    parser.add_argument("--batch", type=int, default=MICRO_BATCH)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all variants together")
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("GPU_RESULT " + json.dumps(worker(args)), flush=True)
        return

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    work.mkdir(exist_ok=True)
    if not (work / "model" / "config.json").exists():
        build_base(work / "model", args.shape, "cuda" if cuda() else "cpu")
    bench_sft.build_data(work / "data.jsonl", args.rows, args.seq)
    setup_s = time.perf_counter() - started
    results = {}
    for variant in args.variants.split(","):
        left = args.budget - (time.perf_counter() - started)
        if left <= 30:
            results[variant] = {"error": "skipped: the time budget was spent"}
            continue
        results[variant] = run_variant(args, variant, work, left)
        print(f"{variant}: {results[variant].get('tokens_per_s', results[variant].get('error'))}", flush=True)
    report = {"shape": args.shape, "settings": {k: str(v) for k, v in vars(args).items() if k not in ("worker",)},
              "setup_s": setup_s, "total_s": time.perf_counter() - started, "results": results,
              "mfu_formula": __doc__[__doc__.index("MFU ="):].strip()}
    text = table(results)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu.md").write_text(f"{results.get('lora', {}).get('device', '')} {args.shape}\n\n{text}\n")
    print(f"\n{text}\n\nwritten: {args.out / 'gpu.json'}, {args.out / 'gpu.md'} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
