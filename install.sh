#!/usr/bin/env bash
# Set-up: torch, DeepSpeed and this package, in the order that works (a CPU machine, or a GPU
# machine with TORCH_SPEC pointing at a CUDA build of torch).
#   bash install.sh            # what a user needs (no test tools), then DeepSpeed's CPU shm op is compiled
#   bash install.sh --test     # the same plus the test extras (pytest, hypothesis, nbclient, ...) and the docs build (mkdocs)
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash install.sh
# Order matters: deepspeed's sdist imports torch at build time, so torch comes first and deepspeed
# is built without build isolation (otherwise pip fetches a second, CUDA torch). What is already
# installed at the pinned version is skipped by pip ("Requirement already satisfied").
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
    "") extras="" ;;
    --test) extras="[test,docs]" ;;
    *) echo "install.sh: unknown option '$1' (none: the user's install; --test: with the test and docs extras)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
step() { echo "install.sh: $*"; }
step "torch (${TORCH_SPEC:-torch==2.13.0})"
$PY -m pip install ${TORCH_SPEC:-torch==2.13.0}
step "deepspeed, built without build isolation"
$PY -m pip install --no-build-isolation -c constraints.txt deepspeed
step "ds-twolevel${extras} (editable)"
$PY -m pip install -c constraints.txt -e ".${extras}"
step "DeepSpeed's CPU shared-memory comm op (compiled once per environment; a GPU build has nothing to compile)"
$PY -m ds_twolevel prebuild
