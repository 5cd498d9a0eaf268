#!/usr/bin/env bash
# Installs the reference tool (llm-compressor) in its own venv, .venv-anchor, so its pins
# (transformers, compressed-tensors) never touch llmpress' .venv. Idempotent: reruns are no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-anchor
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# torch pinned to the local CPU wheel: a bare `torch` would pull gigabytes of CUDA builds.
"$VENV/bin/pip" install --disable-pip-version-check -q torch==2.13.0 llmcompressor
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version

names = ("llmcompressor", "compressed-tensors", "transformers", "torch")
print("anchor:", " | ".join(f"{n} {version(n)}" for n in names))
EOF
