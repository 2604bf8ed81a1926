#!/bin/bash
# Installs the tools benchmarks/peers.py compares lorakit with, each in its own virtual environment under
# PEERS_ROOT (default /work/peers), from the package registry, with PyTorch pinned to the CPU build lorakit uses:
#     bash benchmarks/install_peers.sh [trl] [llamafactory] [axolotl]
# A CPU torch wheel must be findable by pip (TORCH_WHEEL, or pip's own index/find-links); the pin keeps pip from
# replacing it with a multi-GB CUDA build while it resolves the tools' dependencies.
set -euo pipefail
root=${PEERS_ROOT:-/work/peers}
python=${PEERS_PYTHON:-python3.11}          # axolotl 0.19 needs Python 3.11 (0.21 needs 3.12)
torch_wheel=${TORCH_WHEEL:-torch==2.13.0}
mkdir -p "$root"
echo "torch==2.13.0" > "$root/constraints.txt"
declare -A packages=([trl]="trl==1.16.* peft datasets" [llamafactory]="llamafactory==0.9.5" [axolotl]="axolotl==0.19.*")
for tool in "${@:-trl llamafactory axolotl}"; do
  for name in $tool; do
    "$python" -m venv "$root/$name"
    "$root/$name/bin/pip" install -q "$torch_wheel"
    # shellcheck disable=SC2086
    "$root/$name/bin/pip" install -q -c "$root/constraints.txt" ${packages[$name]}
    if [ "$name" = llamafactory ]; then
      # The registry's torchvision and torchaudio are CUDA builds: with a CPU torch, torchvision's compiled ops do
      # not load (transformers then fails to import), and LLaMA-Factory imports torchaudio unconditionally. No
      # audio or image is involved: torchvision goes, and torchaudio keeps only its Python part.
      "$root/$name/bin/pip" uninstall -q -y torchvision
      rm -f "$root/$name"/lib/python3*/site-packages/torchaudio/lib/*.so
    fi
  done
done
