#!/usr/bin/env bash
# The two environments the benchmarks compare, each with only its tool's runtime dependencies:
#   .venv-anchor  llm-compressor (its pins clash with ours: transformers, compressed-tensors)
#   .venv-bench   llmpress as `pip install llmpress` gives it, without the dev and lm-eval
#                 extras: transformers imports scikit-learn, scipy and accelerate eagerly when
#                 they are installed (+1.5 s and +100 MB per run), and a user's compress
#                 environment need not have them. The dev .venv has them through lm-eval.
# Idempotent: reruns are quick no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."
quiet_pip() {
  "$1/bin/python" -m pip install --disable-pip-version-check -q "${@:2}" 2> >(grep -v "is ignored: it is neither" >&2)
}
for VENV in .venv-anchor .venv-bench; do
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # torch pinned to the local CPU wheel: a bare `torch` would pull gigabytes of CUDA builds.
  quiet_pip "$VENV" torch==2.13.0
done
quiet_pip .venv-anchor llmcompressor
quiet_pip .venv-bench -c requirements/ci-constraints.txt -e .
for VENV in .venv-anchor .venv-bench; do
  "$VENV/bin/python" - "$VENV" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None

names = ("llmcompressor", "llmpress", "compressed-tensors", "transformers", "torch")
print(sys.argv[1] + ":", " | ".join(f"{n} {v(n)}" for n in names if v(n)))
PY
done
