#!/usr/bin/env bash
# Sets up the CovidCTDx environment in .venv at the repository root (idempotent).
#   bash tools/setup.sh          runtime: CPU torch + the library + `covidctdx`
#   bash tools/setup.sh --test   the same plus the test tools (pytest, slicer-core)
# torch is pinned to its CPU build (requirements-cpu.txt): a plain `pip install torch`
# can pull a multi-GB CUDA build. The other dependencies are held at the tested versions
# (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-cpu.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}"
.venv/bin/python -c "import torch, CovidCTDxLib; print('covidctdx', CovidCTDxLib.__version__, '| torch', torch.__version__, '| CUDA build:', torch.version.cuda is not None)"
