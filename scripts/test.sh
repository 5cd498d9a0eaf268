#!/usr/bin/env bash
# The tests in both environments that scripts/install.sh made:
#   .venv         CI's pinned set (vLLM's pins): the whole suite;
#   .venv-latest  the newest versions our ranges admit: the tests that break when versions
#                 move (listed below): loading and decompression of every scheme, calibrated
#                 schemes and algorithms (GPTQ, AWQ, one pass per layer) on every model family
#                 and MoE, the KV cache, evaluation, the CLI.
# Both always run; the exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
LATEST_TESTS=(
  tests/test_schemes_roundtrip.py
  tests/test_families.py
  tests/test_calibrate.py
  tests/test_calibrate_families.py
  tests/test_runner.py
  tests/test_gptq.py
  tests/test_awq.py
  tests/test_sequential.py
  tests/test_moe.py
  tests/test_kvcache.py
  tests/test_evaluate.py
  tests/test_cli.py
  tests/test_provenance.py
)
versions() {
  "$1/bin/python" -c 'import transformers as t, compressed_tensors as c; print("transformers", t.__version__, "| compressed-tensors", c.__version__)'
}
status=0
echo "== .venv (pinned): $(versions .venv)"
.venv/bin/python -m pytest -q || status=1
echo "== .venv-latest (newest): $(versions .venv-latest)"
.venv-latest/bin/python -m pytest -q -p no:cacheprovider "${LATEST_TESTS[@]}" || status=1
exit $status
