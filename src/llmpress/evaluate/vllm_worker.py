"""Serve one checkpoint with vLLM and time it; run as a child process by `serving.py`.

    python -m llmpress.evaluate.vllm_worker CHECKPOINT --prompts-json FILE --output-tokens N

Prints one JSON object on a line prefixed `RESULT ` (the fields of `ServingResult`), also when
vLLM cannot load or serve the checkpoint: then `served` is false and `reason` says why. vLLM
lives only here because its import is slow (~7 s) and patches torch process-wide (it replaces
`torch.set_num_threads`), and because a failed engine start can leave state behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

MARK = "RESULT "
KV_CACHE_MIN_BYTES = 256 * 2**20  # ~11k tokens of SmolLM2; vLLM would otherwise size it from RAM
MANY_CORES = 8


def cpu_threads(cores: int) -> int | None:
    """OpenMP threads for vLLM's CPU engine; None leaves torch's default (one per core).

    OpenMP threads wait for each other at every op, so one descheduled thread stalls them all:
    on 2 cores shared with the caller and the OS, decoding with 2 threads is ~10x slower than
    with 1. From 8 cores up the spare cores absorb the rest of the machine and the matmuls
    are large enough to split, so torch's default stands; in between, half the cores (only
    the 2-core case is measured).
    """
    return None if cores >= MANY_CORES else max(1, cores // 2)


def set_env_before_import() -> None:
    """Settings vLLM and OpenMP read once, at import: set here, before torch or vLLM loads.

    Values already in the environment win, so a user can override each one.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = cpu_threads(cores or 1)
    if threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    if not torch.cuda.is_available():
        # The engine runs in this process: with multiprocessing on, the spawned EngineCore
        # re-imports vLLM (~30 s more per checkpoint on 2 cores). On a GPU vLLM's default
        # (a separate engine process, overlapping scheduling with the GPU) is what is served.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def one_line(error: BaseException) -> str:
    """`Type: key line` of an exception, for a report: the first line of its message, or for
    pydantic's ValidationError (vLLM's config checks) the first error's own message."""
    message = str(error)
    errors = getattr(error, "errors", None)
    if callable(errors):
        with contextlib.suppress(Exception):  # not pydantic's: keep str(error)
            message = str(errors()[0]["msg"])
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# How torch reports a custom op that the loaded library does not define.
_MISSING_OP = re.compile(r"'_OpNamespace' '\w+' object has no attribute '(\w+)'")


def reason(error: BaseException) -> str:
    """The one-line reason for a report: `one_line(error)`, said plainly first where vLLM
    picked a kernel whose op its library for this CPU lacks (vLLM's CPU build ships one
    library per ISA; the AVX2 one has no `cpu_gemm_wna16`, which int4 weight-only layers
    call, and vLLM finds out only at the first forward)."""
    text = one_line(error)
    missing = _MISSING_OP.search(str(error))
    if missing is None:
        return text
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    return f"vLLM's CPU kernels for this CPU ({isa}) have no {missing[1]} op: {text}"


def kv_cache_bytes(checkpoint: Path, tokens: int) -> int:
    """A KV cache that holds `tokens` bf16 tokens twice over, at least KV_CACHE_MIN_BYTES.

    vLLM's own sizing takes most of free RAM (CPU) or 90% of the GPU; a fixed size sized to
    the job starts faster and leaves the caller's memory alone.
    """
    try:
        config = json.loads((checkpoint / "config.json").read_text())
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        per_token = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads)
        per_token *= head_dim * 2  # K and V, bf16
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return KV_CACHE_MIN_BYTES  # vLLM reports what is wrong with the checkpoint
    return max(KV_CACHE_MIN_BYTES, 2 * tokens * per_token)


def max_model_len(checkpoint: Path, prompts: list[str], output_tokens: int) -> int:
    """Room for the longest prompt and its output, at least 512 (a context vLLM always has)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        longest = max(len(tokenizer(prompt).input_ids) for prompt in prompts)
    except Exception:  # no tokenizer: vLLM says why when it loads the checkpoint
        return 512
    return max(512, longest + output_tokens)


def measure(llm: Any, prompts: list[str], output_tokens: int) -> dict[str, float]:
    """TTFT, TPOT (ms) and throughput (tokens/s) as `serving.measure_serving` defines them."""
    from vllm import SamplingParams

    def timed(batch: list[str], tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = [len(output.outputs[0].token_ids) for output in outputs]
        if generated != [tokens] * len(batch):
            raise RuntimeError(f"asked {tokens} tokens per prompt, vLLM generated {generated}")
        return seconds

    # Warm-up: first-call allocations and lazy kernel setup, for one stream and for the batch.
    timed(prompts[:1], output_tokens)
    timed(prompts, 2)
    ttft, tpot = [], []
    for prompt in prompts:
        first = timed([prompt], 1)
        whole = timed([prompt], output_tokens)
        ttft.append(first)
        tpot.append((whole - first) / (output_tokens - 1))
    batch = timed(prompts, output_tokens)
    return {
        "ttft_ms": 1000 * statistics.median(ttft),
        "tpot_ms": 1000 * statistics.median(tpot),
        "throughput_tok_s": len(prompts) * output_tokens / batch,
    }


def serve(checkpoint: Path, prompts: list[str], output_tokens: int) -> dict[str, Any]:
    """Load `checkpoint` in vLLM and measure it; every failure becomes `served: false`."""
    import torch

    result: dict[str, Any] = {
        "served": False,
        "reason": None,
        "ttft_ms": None,
        "tpot_ms": None,
        "throughput_tok_s": None,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "vllm_version": None,
    }
    try:
        import vllm

        result["vllm_version"] = vllm.__version__
        length = max_model_len(checkpoint, prompts, output_tokens)
        llm = vllm.LLM(
            model=str(checkpoint),
            dtype="bfloat16",
            # CUDA graphs are part of serving on a GPU; on CPU, torch.compile takes minutes.
            enforce_eager=not torch.cuda.is_available(),
            max_model_len=length,
            max_num_seqs=len(prompts),
            kv_cache_memory_bytes=kv_cache_bytes(checkpoint, len(prompts) * length),
            # A repeated prompt would skip its prefill, and TPOT subtracts a TTFT that had one.
            enable_prefix_caching=False,
        )
        result.update(measure(llm, prompts, output_tokens), served=True)
    except Exception as error:  # the reason is the result
        result["reason"] = reason(error)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--prompts-json", type=Path, required=True, help="a JSON list of str")
    parser.add_argument("--output-tokens", type=int, default=32)
    args = parser.parse_args()
    prompts = json.loads(args.prompts_json.read_text())
    set_env_before_import()
    result = serve(args.checkpoint, prompts, args.output_tokens)
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
