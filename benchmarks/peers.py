#!/usr/bin/env python
"""lorakit against the trl CLI, LLaMA-Factory and axolotl: the same SFT job through each tool, side by side.

    python benchmarks/peers.py --rounds 3 --markdown peers.md --json peers.json    # the job, packing off and on
    python benchmarks/peers.py --defaults --markdown defaults.md                    # each tool's five-line config
    python benchmarks/peers.py --base smollm2 --rounds 1                            # on SmolLM2-135M

Each peer lives in its own virtual environment, PEERS_ROOT/<tool> (default /work/peers; see docs/benchmarks.md for
how they were installed), and runs through its own command line on a config from benchmarks/peer_configs/. lorakit
runs from the interpreter that runs this script. A tool that is not installed, or that fails, gets its exact error
in the table and the rest go on.

The job (benchmarks/peer_job.py): the same base folder and 700 chat rows, LoRA r 16 on every linear layer, learning
rate 2e-4 with linear decay and no warm-up, 30 optimizer steps of 4 rows, max length 512, float32 (lorakit: its own
dtype choice, which the table names), no activation checkpointing, loss on the assistant replies only; packing off,
then on. Every round runs every tool once (A B C D A B C D ...), alone and then beside a CPU-bound neighbour process
(`--conditions`); each cell reports its best round, and the spread of its rounds as the noise. `lorakit-fp32` in
`--tools` adds lorakit with its model dtype forced to float32, beside its own choice; `lorakit-2proc`, lorakit on
one thread in each of two processes (`--num-processes 2`, the same 4 rows a step), its tokens and memory added up
over both.

Measured, the same way for every tool (benchmarks/peer_probe/sitecustomize.py is loaded into each process):
wall time from the command's start to its exit with the adapter saved; real tokens the trainer was handed (non-pad)
over the time inside Trainer.train; peak RSS of the process tree (wait4); the mean of the last five logged losses;
the held-out loss of the saved adapter on 64 unseen rows (assistant tokens, computed here with plain peft); and
`--help` start-up time, best of three.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_job

HERE = Path(__file__).resolve().parent
PROBE = HERE / "peer_probe"
TOOLS = ("lorakit", "trl", "llamafactory", "axolotl")
COMMANDS = {  # (train command, --help command); the executable is looked up in the tool's environment
    "lorakit": (["lorakit", "sft", "{config}"], ["lorakit", "--help"]),
    "trl": (["trl", "sft", "--config", "{config}"], ["trl", "sft", "--help"]),
    "llamafactory": (["llamafactory-cli", "train", "{config}"], ["llamafactory-cli", "help"]),
    "axolotl": (["axolotl", "train", "{config}"], ["axolotl", "train", "--help"]),
}
# lorakit with a setting of its own changed, beside its defaults: NAME -> (tool, model.dtype, processes).
# lorakit-2proc: data parallel on one thread in each of two processes (`--num-processes 2`), the same 4 rows a step.
VARIANTS = {"lorakit-fp32": ("lorakit", "float32", 1), "lorakit-2proc": ("lorakit", None, 2)}
NEIGHBOUR = "while True: pass"  # one CPU-bound thread, as a compile or another training job would be


def tool_bin(tool: str, peers_root: Path) -> Path:
    tool = VARIANTS.get(tool, (tool,))[0]
    return Path(sys.executable).parent if tool == "lorakit" else peers_root / tool / "bin"


def clean_env(work: Path, tool: str, probe: Path | None, peers_root: Path) -> dict:
    """The tool's environment first on PATH (axolotl relaunches `python3 -m ...`), no thread settings of ours."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OMP_", "MKL_", "LORAKIT_BENCH", "GOMP_", "KMP_", "VIRTUAL_ENV"))}
    binary = tool_bin(tool, peers_root)
    env.update(PATH=f"{binary}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(binary.parent))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled",
               DISABLE_VERSION_CHECK="1", HF_HOME=str(work / "hf-home" / tool),
               LORAKIT_CACHE=str(work / "lorakit-cache"), PYTHONPATH=str(PROBE))
    if VARIANTS.get(tool, (tool,))[0] == "lorakit":
        # The lorakit of this checkout (a worktree being measured), ahead of whichever one the venv has installed.
        env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent.parent)
    if probe is not None:
        env["LORAKIT_BENCH_PROBE"] = str(probe)
    return env


def run_tool(tool: str, config: Path, output: Path, work: Path, peers_root: Path, timeout: int) -> dict:
    """Run one tool's training command; what it measured, or the exact error it stopped with."""
    binary = tool_bin(tool, peers_root)
    command = [part.format(config=config) for part in COMMANDS[VARIANTS.get(tool, (tool,))[0]][0]]
    processes = VARIANTS.get(tool, (tool, None, 1))[2]
    if processes > 1:
        command += ["--num-processes", str(processes)]
    if not (binary / command[0]).exists():
        return {"ok": False, "error": f"not installed: {binary / command[0]} is missing"}
    command[0] = str(binary / command[0])
    probe = output.parent / f"{output.name}.probe.json"
    log = output.parent / f"{output.name}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=output.parent,
                                   env=clean_env(work, tool, probe, peers_root), start_new_session=True)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(process.pid, 9)
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    result = {"wall_s": wall, "rc": process.returncode, "peak_rss": usage.ru_maxrss * 1024,
              "cpu_share": (usage.ru_utime + usage.ru_stime) / wall, "log": str(log)}
    adapter = peer_job.find_adapter(output)
    measured = read_probes(probe)
    if process.returncode != 0 or adapter is None or measured is None:
        why = "timed out" if wall > timeout else first_error(log.read_text(errors="replace"))
        return {**result, "ok": False, "error": why or f"exit {process.returncode}, no adapter saved"}
    if measured.get("processes", 1) > 1:
        # wait4 gives the largest single process of the tree; several training processes hold memory together.
        result["peak_rss"] = measured["peak_at_train_end"]
    losses = measured["losses"]
    return {**result, **measured, "ok": True, "adapter": str(adapter), "config": str(config),
            "tokens_per_s": measured["real_tokens"] / measured["train_seconds"],
            "final_loss": statistics.fmean(losses[-5:]) if losses else None}


def read_probes(probe: Path) -> dict | None:
    """What the probe recorded: one file, or one per process of a multi-process run (probe.rankN), added up: the
    tokens of every process over the slowest one's time, the losses the trainer logged (the same on every rank),
    the peaks added together."""
    ranks = sorted(probe.parent.glob(f"{probe.name}.rank*"))
    if not ranks:
        return json.loads(probe.read_text()) if probe.exists() else None
    records = [json.loads(path.read_text()) for path in ranks]
    merged = {**records[0], "processes": len(records),
              "train_seconds": max(record["train_seconds"] for record in records)}
    for key in ("real_tokens", "trained_tokens", "padded_tokens", "micro_batches"):
        merged[key] = sum(record[key] for record in records)
    for key in ("peak_before_train", "peak_at_train_end", "rss_at_train_start"):
        merged[key] = sum(record.get(key) or 0 for record in records)
    return merged


def first_error(log: str) -> str:
    """The line a user would read: the last exception line (`SomethingError: ...`), else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [index for index, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Exit)\b.*:", line)]
    # A tool that re-launches itself ends on the launcher's CalledProcessError: the child's own error comes first.
    own = [index for index in errors if "CalledProcessError" not in lines[index]] or errors
    if not own:
        return (lines[-1] if lines else "")[:400]
    index = own[-1]
    # pydantic names the field on the next line and says what is wrong with it on the one after
    detail = " ".join(lines[index + 1:index + 3]) if "validation error" in lines[index] else ""
    return f"{lines[index]} {detail}".strip()[:400]


def help_time(tool: str, peers_root: Path, work: Path, tries: int = 3) -> float | str:
    binary = tool_bin(tool, peers_root)
    command = COMMANDS[tool][1]
    if not (binary / command[0]).exists():
        return "not installed"
    times = []
    for _ in range(tries):
        started = time.perf_counter()
        done = subprocess.run([str(binary / command[0]), *command[1:]], capture_output=True,
                              env=clean_env(work, tool, None, peers_root), timeout=120, check=False)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            return first_error((done.stdout + done.stderr).decode(errors="replace"))
    return min(times)


# ---------------------------------------------------------------- the job, interleaved


def run_job(args, work: Path, paths: dict) -> dict:
    runs = work / "runs"
    cells: dict[str, list[dict]] = {}
    conditions, packings = args.conditions, {"off": [False], "on": [True], "both": [False, True]}[args.packing]
    for round_index in range(args.rounds):
        for condition in conditions:
            neighbour = (subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if condition == "neighbour" else None)
            try:
                for packing in packings:
                    for tool in args.tools:
                        key = cell_key(tool, packing, condition)
                        output = runs / f"{key}-r{round_index}"
                        base_tool, dtype, processes = VARIANTS.get(tool, (tool, args.lorakit_dtype, 1))
                        config = peer_job.write_config(base_tool, paths, output, packing, lorakit_dtype=dtype,
                                                       processes=processes)
                        result = run_tool(tool, config, output, work, args.peers_root, args.timeout)
                        cells.setdefault(key, []).append(result)
                        print(f"round {round_index + 1} {key}: " + (
                            f"{result['wall_s']:.1f} s wall, {result['tokens_per_s']:.0f} tokens/s, "
                            f"loss {result['final_loss']:.3f}" if result["ok"] else f"FAILED {result['error']}"),
                            flush=True)
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    return cells


def cell_key(tool: str, packing: bool, condition: str) -> str:
    return f"{tool}-packing_{'on' if packing else 'off'}-{condition}"


def summarize(cells: dict[str, list[dict]]) -> dict[str, dict]:
    """Per cell: the best round (highest tokens/s) and the spread of the rounds."""
    summary = {}
    for key, results in cells.items():
        good = [r for r in results if r["ok"]]
        if not good:
            summary[key] = {"ok": False, "error": results[-1]["error"], "runs": len(results)}
            continue
        best = max(good, key=lambda r: r["tokens_per_s"])
        rates = [r["tokens_per_s"] for r in good]
        summary[key] = {**best, "runs": len(results), "failed_runs": len(results) - len(good),
                        "best_wall_s": min(r["wall_s"] for r in good),
                        "spread": (max(rates) - min(rates)) / max(rates) if len(rates) > 1 else 0.0}
    return summary


# ---------------------------------------------------------------- tables


def ratio(value, reference) -> str:
    return f" ({value / reference:.2f}x)" if reference else ""


def job_table(summary: dict, helps: dict, tools, conditions, packings) -> str:
    lines = [("| tool | packing | beside | wall s to adapter (x lorakit) | train tokens/s (x lorakit) | "
              "peak RSS MiB (x lorakit) | last-5 train loss | held-out loss | `--help` s | CPU used | spread |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for condition in conditions:
        for packing in packings:
            reference = summary.get(cell_key("lorakit", packing, condition), {})
            for tool in tools:
                cell = summary.get(cell_key(tool, packing, condition))
                if cell is None:
                    continue
                where = "neighbour" if condition == "neighbour" else "nothing"
                helped = helps.get(tool)
                help_cell = f"{helped:.2f}" if isinstance(helped, float) else (helped or "")
                if not cell["ok"]:
                    lines.append(f"| {tool} | {'on' if packing else 'off'} | {where} | failed: "
                                 f"`{cell['error']}` | | | | | {help_cell} | | |")
                    continue
                ok = reference.get("ok")
                heldout = f"{cell['heldout_loss']:.3f}" if "heldout_loss" in cell else ""
                lines.append(
                    f"| {tool} | {'on' if packing else 'off'} | {where} "
                    f"| {cell['best_wall_s']:.1f}{ratio(cell['best_wall_s'], reference.get('best_wall_s')) if ok else ''} "
                    f"| {cell['tokens_per_s']:,.0f}{ratio(cell['tokens_per_s'], reference.get('tokens_per_s')) if ok else ''} "
                    f"| {cell['peak_rss'] / 2**20:,.0f}{ratio(cell['peak_rss'], reference.get('peak_rss')) if ok else ''} "
                    f"| {cell['final_loss']:.3f} | {heldout} | {help_cell} | {100 * cell['cpu_share']:.0f}% "
                    f"| {100 * cell['spread']:.0f}% |")
    return "\n".join(lines)


def defaults_table(results: dict) -> str:
    lines = [("| tool | outcome | wall s | tokens/s | frozen weights | autocast | checkpointing | micro-batch | "
              "held-out loss |"), "|---|---|---|---|---|---|---|---|---|"]
    for tool, r in results.items():
        if not r["ok"]:
            lines.append(f"| {tool} | failed: `{r['error']}` | {r.get('wall_s', 0):.1f} | | | | | | |")
            continue
        s = r["settings"]
        autocast = "bf16" if s["bf16_autocast"] else "fp16" if s["fp16_autocast"] else "none"
        lines.append(f"| {tool} | trained | {r['wall_s']:.1f} | {r['tokens_per_s']:,.0f} | {'/'.join(s['frozen_dtypes'])} "
                     f"| {autocast} | {'on' if s['checkpointing'] else 'off'} | {s['micro_batch']} "
                     f"| {r.get('heldout_loss', float('nan')):.3f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", default=",".join(TOOLS), type=lambda text: text.split(","))
    parser.add_argument("--peers-root", type=Path, default=Path(os.environ.get("PEERS_ROOT", "/work/peers")))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--packing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--conditions", default="alone,neighbour", type=lambda text: text.split(","),
                        help="alone, and/or beside a CPU-bound neighbour process (every round runs each)")
    parser.add_argument("--base", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--lorakit-dtype", help="force lorakit's model.dtype (default: its own choice)")
    parser.add_argument("--defaults", action="store_true", help="run each tool's five-line config instead")
    parser.add_argument("--timeout", type=int, default=900, help="seconds one run may take")
    parser.add_argument("--help-tries", type=int, default=3, help="`--help` timings per tool (0: none)")
    parser.add_argument("--workdir", type=Path, help="keep the job and the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = peer_job.build_job(work, args.base)
    report: dict = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.defaults:
        results = {}
        for tool in args.tools:
            output = work / "defaults" / tool
            config = peer_job.write_config(tool, paths, output, False, defaults=True)
            results[tool] = run_tool(tool, config, output, work, args.peers_root, args.timeout)
        report["base_heldout_loss"] = add_heldout(results, paths)
        report["defaults"] = results
        table = defaults_table(results)
    else:
        helps = {tool: help_time(tool, args.peers_root, work, args.help_tries) for tool in args.tools
                 if tool not in VARIANTS and args.help_tries}
        summary = summarize(run_job(args, work, paths))
        report["base_heldout_loss"] = add_heldout(summary, paths)
        add_memory_check(summary, paths)
        report.update(helps=helps, summary=summary)
        packings = {"off": [False], "on": [True], "both": [False, True]}[args.packing]
        table = job_table(summary, helps, args.tools, args.conditions, packings)
        memory = memory_lines(summary)
        table += f"\n\n{memory}" if memory else ""
    table += f"\n\nHeld-out loss of the untrained base: {report['base_heldout_loss']:.3f}"
    print(f"\n{report['machine']}\n\n{table}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(f"{report['machine']}\n\n{table}\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def add_heldout(cells: dict, paths: dict) -> float:
    """Each saved adapter's held-out loss, into its cell; returns the untrained base's."""
    adapters = {key: Path(cell["adapter"]) for key, cell in cells.items() if cell.get("ok")}
    losses = peer_job.heldout_losses(paths["model"], adapters, paths["heldout"])
    for key in adapters:
        cells[key]["heldout_loss"] = losses[key]
    return losses["base"]


def add_memory_check(summary: dict, paths: dict) -> None:
    """lorakit validate's CPU estimate (the whole process: libraries, tensors, the freed blocks glibc keeps) against
    each lorakit run's measured peak RSS."""
    longest = peer_job.longest_row(paths["model"], paths["train_file"])
    for key, cell in summary.items():
        if key.startswith("lorakit-") and key.endswith("-alone") and cell.get("ok") and cell.get("peak_rss"):
            estimate = peer_job.memory_estimate(Path(cell["config"]), paths["model"], longest)
            # One process's estimate; processes on one CPU hold that much each (as `lorakit validate` adds up).
            total = estimate["total"] * cell.get("processes", 1)
            cell["memory_check"] = {"estimate": {**estimate, "total": total}, "measured": cell["peak_rss"],
                                    "ratio": cell["peak_rss"] / total, "longest_row_tokens": longest}


def memory_lines(summary: dict) -> str:
    rows = [f"| {key} | {check['estimate']['total'] / 2**20:,.0f} | {check['measured'] / 2**20:,.0f} "
            f"| {check['ratio']:.2f} |" for key, cell in summary.items() if (check := cell.get("memory_check"))]
    if not rows:  # no lorakit run alone: no table
        return ""
    return "\n".join(["| lorakit run | `lorakit validate` estimate MiB | measured peak RSS MiB | measured / estimate |",
                      "|---|---|---|---|", *rows])


def machine() -> str:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Machine: {model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB, no GPU used; "
            f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
