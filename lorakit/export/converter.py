"""llama.cpp's own GGUF converters and quantize tool: found on this machine, never downloaded, run in a subprocess.

lorakit does not ship or fetch llama.cpp. The converter scripts (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`,
with their `conversion/` and `gguf-py/` folders) come from a llama.cpp source tree the user already has, named by
LORAKIT_LLAMA_CPP: a git checkout of llama.cpp, or the llama-cpp-python source distribution from the package
registry (its `vendor/llama.cpp`). They run under this environment's Python, so under the project's transformers
(llama.cpp's own requirements pin an older one that cannot read tokenizers saved by transformers 5).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lorakit.errors import LorakitError

LLAMA_CPP_ENV = "LORAKIT_LLAMA_CPP"
HF_CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# What the converter writes itself; every other type is made from an f16/bf16 GGUF by llama-quantize.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TOOL = "llama-quantize"
SETUP_HINT = ("pip install 'lorakit[export]', get llama.cpp's sources (a git checkout, or `pip download --no-deps "
              "--no-binary :all: llama-cpp-python` and unpack it) and set LORAKIT_LLAMA_CPP to that folder; "
              "see docs/export.md")


def find_llama_cpp() -> Path:
    """The llama.cpp source folder holding the converters, from LORAKIT_LLAMA_CPP."""
    named = os.environ.get(LLAMA_CPP_ENV)
    if not named:
        raise LorakitError(f"GGUF export needs llama.cpp's converter, and {LLAMA_CPP_ENV} is not set: {SETUP_HINT}")
    root = Path(named).expanduser()
    for folder in (root, root / "vendor" / "llama.cpp", *root.glob("llama_cpp_python-*/vendor/llama.cpp")):
        if (folder / HF_CONVERTER).is_file():
            return folder.resolve()
    raise LorakitError(f"{LLAMA_CPP_ENV}={named} holds no {HF_CONVERTER} (nor vendor/llama.cpp/{HF_CONVERTER}); "
                       "point it at a llama.cpp source folder or an unpacked llama-cpp-python source distribution")


def check_python_packages() -> None:
    """The converter's Python needs: gguf (also how transformers reads a GGUF back) and sentencepiece."""
    missing = [name for name in ("gguf", "sentencepiece") if importlib.util.find_spec(name) is None]
    if missing:
        raise LorakitError(f"GGUF export needs the Python package(s) {', '.join(missing)}: "
                           "pip install 'lorakit[export]'")


def known_types() -> dict[str, str]:
    """Every GGUF file type llama.cpp names (lower case, as users write them) -> llama-quantize's name for it."""
    import gguf

    names = {}
    for member in gguf.LlamaFileType:
        name = member.name
        if name.startswith("MOSTLY_"):
            names[name.removeprefix("MOSTLY_").lower()] = name.removeprefix("MOSTLY_")
    names["f32"] = "F32"
    names.pop("guessed", None)
    return names


def check_quant(quant: str) -> str:
    """The lower-case type name, or one line listing what would be right."""
    wanted = quant.lower()
    types = known_types()
    if wanted not in types:
        shown = ", ".join([*CONVERTER_TYPES, *sorted(set(types) - set(CONVERTER_TYPES))])
        raise LorakitError(f"--quant {quant}: not a GGUF type llama.cpp knows; choose one of {shown}")
    if wanted in ("tq1_0", "tq2_0"):
        raise LorakitError(f"--quant {quant}: ternary types are only for models trained ternary (BitNet); "
                           "choose f16, bf16, q8_0 or a k-quant such as q4_k_m")
    return wanted


def find_quantize_tool(llama_cpp: Path) -> Path:
    """llama-quantize: on PATH, or built in the llama.cpp folder (build/bin)."""
    found = shutil.which(QUANTIZE_TOOL)
    if found:
        return Path(found)
    for candidate in (llama_cpp / "build" / "bin" / QUANTIZE_TOOL, llama_cpp / QUANTIZE_TOOL):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise LorakitError(f"this type is made by llama.cpp's {QUANTIZE_TOOL}, which is neither on PATH nor in "
                       f"{llama_cpp / 'build' / 'bin'}; build it (cmake -B build -DGGML_NATIVE=OFF && cmake --build "
                       f"build --target {QUANTIZE_TOOL}) or choose a type the converter writes itself: "
                       f"{', '.join(CONVERTER_TYPES)}")


def run_converter(llama_cpp: Path, script: str, arguments: list[str], settings: dict, work: Path) -> None:
    """Run one converter script through lorakit's driver (lorakit.export.llama_cpp_driver) in a subprocess.

    `settings` carries what the driver adds on top of the converter (metadata, tokenizer keys, pre-tokenizer).
    A failure is told in one line with the converter's own last words; its whole log is kept in a temp file.
    """
    settings_file = work / "lorakit-converter-settings.json"
    settings_file.write_text(json.dumps(settings), encoding="utf-8")
    command = [sys.executable, "-m", "lorakit.export.llama_cpp_driver", str(settings_file),
               str(llama_cpp / script), *arguments]
    # Nothing is fetched: the converter reads local folders only, and the Hub stays off for it.
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
    finally:
        settings_file.unlink(missing_ok=True)
    if done.returncode == 0:
        return
    log = done.stdout + done.stderr
    kept = Path(tempfile.mkstemp(prefix="lorakit-convert-", suffix=".log")[1])
    kept.write_text(" ".join(command) + "\n\n" + log, encoding="utf-8")
    raise LorakitError(f"llama.cpp's {script} failed: {converter_reason(log)} (its whole output: {kept})")


def converter_reason(log: str) -> str:
    """The line of the converter's output that says what went wrong, turned into advice where it is known."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    driver = [line.removeprefix("lorakit: ") for line in lines if line.startswith("lorakit: ")]
    if driver:
        return driver[-1]
    for line in lines:
        if "is not supported" in line and line.startswith(("ERROR:", "Model ")):
            model = line.split("Model ", 1)[-1].split(" is not supported")[0]
            return (f"the architecture {model} is not supported by this llama.cpp; a newer llama.cpp may "
                    "support it")
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def run_quantize(tool: Path, source: Path, target: Path, type_name: str) -> None:
    done = subprocess.run([str(tool), str(source), str(target), type_name], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise LorakitError(f"{tool.name} {type_name} failed: {(lines or ['no output'])[-1].strip()}")
