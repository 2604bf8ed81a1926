"""Running a training command (`lorakit sft`, `dpo`, `classify`) on several processes through accelerate (torchrun underneath, FSDP/DeepSpeed behind it).

lorakit has no launcher of its own: `lorakit sft RECIPE --num-processes N` re-runs itself as
`accelerate launch [--config_file F] ... -m lorakit sft RECIPE ...`, so `accelerate launch -m lorakit sft` and
`torchrun -m lorakit sft` behave the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

# Environment variables that mean "this process was started by a distributed launcher".
LAUNCHED_MARKERS = ("LOCAL_RANK", "ACCELERATE_LAUNCHED", "TORCHELASTIC_RUN_ID")


def already_launched() -> bool:
    return any(name in os.environ for name in LAUNCHED_MARKERS)


def is_main_process() -> bool:
    """Whether this is the process that locks, records and speaks for the run (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def read_accelerate_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        return {"_error": str(error)}
    return data if isinstance(data, dict) else {"_error": "not a mapping"}


def incompatibility(config_path: Path, quantization: dict | None) -> str | None:
    """Why this accelerate config cannot run this recipe's quantization, and what to use instead; None if it can."""
    config = read_accelerate_config(config_path)
    if "_error" in config:
        return f"{config_path} is not a readable accelerate config: {config['_error']}"
    kind = str(config.get("distributed_type", "")).upper()
    quantization = quantization or {}
    eight, four = quantization.get("load_in_8bit"), quantization.get("load_in_4bit")
    if kind == "FSDP":
        if eight:
            return ("8-bit (LLM.int8) weights cannot be sharded by FSDP; use quantization.load_in_4bit (QLoRA, "
                    "recipes/accelerate/fsdp2-qlora.yaml) or DDP (recipes/accelerate/ddp.yaml)")
        storage = quantization.get("bnb_4bit_quant_storage")
        compute = quantization.get("bnb_4bit_compute_dtype")
        if four and storage and compute and storage != compute:
            return (f"FSDP shards 4-bit weights stored as {storage} next to {compute} parameters; set "
                    "quantization.bnb_4bit_quant_storage equal to bnb_4bit_compute_dtype (or leave both unset)")
        fsdp = config.get("fsdp_config") or {}
        if four and fsdp.get("fsdp_offload_params"):
            return "QLoRA under FSDP cannot offload parameters to CPU; set fsdp_offload_params: false"
    if kind == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        stage = int(deepspeed.get("zero_stage", 0) or 0)
        offload = str(deepspeed.get("offload_param_device", "none")).lower() not in ("none", "")
        if eight and stage == 3:
            return ("8-bit weights cannot be partitioned by ZeRO-3; use ZeRO-2 "
                    "(recipes/accelerate/deepspeed-zero2.yaml) or 4-bit QLoRA")
        if four and stage == 3 and offload:
            return ("QLoRA with ZeRO-3 parameter offload is not supported by bitsandbytes; use ZeRO-3 without "
                    "offload (recipes/accelerate/deepspeed-zero3.yaml) or FSDP2 QLoRA (recipes/accelerate/fsdp2-qlora.yaml)")
    return None


def launch_command(sft_args: list[str], num_processes: int | None, accelerate_config: str | None,
                   num_machines: int | None = None, machine_rank: int | None = None,
                   main_process_ip: str | None = None, main_process_port: int | None = None, *,
                   command_name: str = "sft") -> list[str]:
    """The `accelerate launch` command line that runs `lorakit <command_name>` with `sft_args` on every process."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", str(accelerate_config)]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
        if not accelerate_config and num_processes > 1:
            command += ["--multi_gpu"]  # DDP through torchrun; gloo on CPU, NCCL on GPUs
    if num_machines and num_machines > 1:
        command += ["--num_machines", str(num_machines), "--machine_rank", str(machine_rank or 0)]
        if main_process_ip:
            command += ["--main_process_ip", main_process_ip]
    if main_process_port is not None:
        command += ["--main_process_port", str(main_process_port)]
    elif not (num_machines and num_machines > 1):
        command += ["--main_process_port", "0"]  # a free port, so two runs on one machine don't collide
    return command + ["-m", "lorakit", command_name, *sft_args]


def threads_per_process(num_processes: int | None, num_machines: int | None,
                        accelerate_config: str | None) -> int:
    """CPU threads for each process, so that the processes on this machine share its cores without
    oversubscribing them: on a CPU-only run each process trains on its share, and on GPUs the share is what
    each process's CPU work (collation, the optimizer of an offloaded model) gets."""
    from lorakit.training.threads import usable_cores

    config = read_accelerate_config(Path(accelerate_config)) if accelerate_config else {}

    def count(value) -> int:
        return value if isinstance(value, int) and value > 0 else 1  # accelerate itself rejects the rest

    here = -(-count(num_processes or config.get("num_processes")) // count(num_machines or config.get("num_machines")))
    return max(1, usable_cores() // here)


def relaunch(command: list[str], threads: int = 1, output_dir: Path | None = None) -> int:
    """Run the launcher and return its exit status; each process gets `threads` CPU threads unless the user set
    OMP_NUM_THREADS.

    SIGTERM/SIGINT sent to this process (a scheduler preempting the job) are passed on to the launcher, which
    passes them to every worker; the workers checkpoint at the next step and exit 75. torch's launcher reports
    its own death by the signal (143) instead, so when the run folder's record says the run was interrupted,
    this returns the workers' 75, which tells a scheduler the job can be requeued and will resume.
    """
    import signal

    from lorakit.errors import EXIT_INTERRUPTED
    from lorakit.training import run_dir

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    child = subprocess.Popen(command, env=env)
    forwarded = []

    def forward(signum, frame):
        forwarded.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forwarded and status != 0 and output_dir is not None:
        record = run_dir.read_record(output_dir) or {}
        if record.get("status") == run_dir.INTERRUPTED:
            return EXIT_INTERRUPTED
    return status
