#!/usr/bin/env bash
# One-command set-up (CPU machine, or a GPU machine with TORCH_SPEC pointing at a CUDA build).
#   bash install.sh              # CPU: torch 2.13.0 CPU wheel, deepspeed, this package + test extras
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash install.sh
# Order matters: deepspeed's sdist imports torch at build time, so torch comes first and
# deepspeed is built without build isolation (otherwise pip fetches a second, CUDA torch).
set -euo pipefail
cd "$(dirname "$0")"
PIP="${PYTHON:-python} -m pip"
$PIP install ${TORCH_SPEC:-torch==2.13.0}
$PIP install --no-build-isolation -c constraints.txt deepspeed
$PIP install -c constraints.txt -e ".[test]"
