"""Data-free quantization, side by side: llmpress vs llm-compressor vs a plain copy.

Every tool runs as its own subprocess, so wall time and peak RSS cover the whole job
(imports, load, quantize, save), as a user would see it. Each tool runs from an environment
holding only its runtime dependencies (bench/setup_envs.sh): llm-compressor from .venv-anchor,
llmpress from .venv-bench (the dev .venv carries lm-eval's scikit-learn and scipy, which
transformers imports eagerly).

    .venv/bin/python bench/bench_datafree.py --models smollm2,llama1b --repeat 1

Results: a table on stdout, bench/results/datafree.json (merged by model/scheme/tool) and
each run's log in bench/results/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchlib import (
    ANCHOR_PY,
    BENCH_CACHE,
    LLMPRESS,
    MB,
    RESULTS_DIR,
    SMOLLM2,
    Run,
    dir_bytes,
    fmt,
    last_error,
    measure,
    prepare_cache,
    summarize,
    versions,
)

MODELS = {"smollm2": SMOLLM2, "llama1b": BENCH_CACHE / "llama-1b-random"}
# SmolLM2's hidden size 576 is not a multiple of 128.
GROUP_SIZE = {"smollm2": 64, "llama1b": 128}
SCHEMES = ("FP8_DYNAMIC", "W4A16")
TOOLS = ("oneshot", "model_free", "llmpress", "copy")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


# ---------------------------------------------------------------- the generated 1B model


def build_llama1b(path: Path) -> None:
    """Random bf16 Llama-3.2-1B-shaped model (1.17B params): big enough that I/O dominates."""
    if not (path / "model.safetensors.index.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=49152,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
            initializer_range=0.02,
            bos_token_id=1,
            eos_token_id=2,
        )
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.no_grad():  # init is normal(0, 0.02) from initializer_range
            model = LlamaForCausalLM(cfg)
        torch.set_default_dtype(torch.float32)
        model.config.dtype = torch.bfloat16
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size="1GB")  # several shards, like real models
        del model
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    # Loaders want a tokenizer; SmolLM2's vocab (49152) matches, so borrow its files.
    for name in TOKENIZER_FILES:
        if (SMOLLM2 / name).exists() and not (path / name).exists():
            shutil.copy(SMOLLM2 / name, path / name)


# ---------------------------------------------------------------- workers (subprocesses)


def _scheme(name: str, group_size: int) -> Any:
    """The preset name where it fits, else the preset with its group size replaced."""
    from compressed_tensors.quantization import preset_name_to_scheme

    qs = preset_name_to_scheme(name, ["Linear"])
    if qs.weights is None or qs.weights.group_size in (None, group_size):
        return name
    qs.weights = qs.weights.model_copy(update={"group_size": group_size})
    return qs


def work_oneshot(model_dir: str, out: str, scheme: str, group_size: int) -> None:
    """llm-compressor's documented data-free path: load, oneshot, save compressed."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    qs = _scheme(scheme, group_size)
    if isinstance(qs, str):
        recipe = QuantizationModifier(targets="Linear", scheme=qs, ignore=["lm_head"])
    else:
        recipe = QuantizationModifier(config_groups={"group_0": qs}, ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(out, save_compressed=True)
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    except Exception as exc:  # a missing tokenizer should not fail the timing
        print(f"tokenizer not saved: {exc}", file=sys.stderr)


def work_model_free(model_dir: str, out: str, scheme: str, group_size: int) -> None:
    """llm-compressor's model_free_ptq: shard by shard, no model definition.

    It matches tensors by name only, so embeddings must be ignored explicitly to quantize
    the same Linear layers as oneshot.
    """
    from llmcompressor import model_free_ptq

    model_free_ptq(
        model_dir,
        out,
        scheme=_scheme(scheme, group_size),
        ignore=["lm_head", "model.embed_tokens"],
        device="cpu",
    )


def work_copy(model_dir: str, out: str, scheme: str, group_size: int) -> None:
    """Read + write every safetensors byte: the I/O floor any tool pays."""
    del scheme, group_size
    os.makedirs(out)
    for src in sorted(Path(model_dir).glob("*.safetensors")):
        with src.open("rb") as fin, open(Path(out) / src.name, "wb") as fout:
            while chunk := fin.read(64 << 20):
                fout.write(chunk)


WORKERS = {"oneshot": work_oneshot, "model_free": work_model_free, "copy": work_copy}


# ---------------------------------------------------------------- measuring


def command(tool: str, model_dir: Path, out: Path, scheme: str, group_size: int) -> list[str]:
    if tool == "llmpress":
        cmd = [str(LLMPRESS), "compress", str(model_dir), "-o", str(out), "--scheme", scheme]
        return cmd + (["--group-size", str(group_size)] if scheme == "W4A16" else [])
    python = sys.executable if tool == "copy" else str(ANCHOR_PY)
    return [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        tool,
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--scheme",
        scheme,
        "--group-size",
        str(group_size),
    ]


def run_one(model: str, scheme: str, tool: str, cold: bool) -> Run:
    model_dir = MODELS[model]
    in_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    run = Run(model, scheme, tool, round(in_bytes / MB, 1))
    prepare_cache(model_dir, cold)
    run.load1 = round(os.getloadavg()[0], 2)
    (BENCH_CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=BENCH_CACHE / "tmp"))  # same disk as the input
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{model}-{scheme}-{tool}.log"
    try:
        wall, cpu, peak, rc = measure(
            command(tool, model_dir, tmp / "out", scheme, GROUP_SIZE[model]), tmp, log
        )
        if rc == 0:
            run.wall_s, run.cpu_s = round(wall, 2), round(cpu, 2)
            run.peak_rss_mb = round(peak / MB, 1)
            run.out_mb = round(dir_bytes(tmp / "out") / MB, 1)
        else:
            run.error = last_error(log)
    except OSError as exc:  # e.g. the llmpress CLI is not installed yet
        run.error = str(exc)[:200]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.sync()
    return run


# ---------------------------------------------------------------- reporting


def print_table(rows: list[dict[str, Any]]) -> None:
    copy_tput = {r["model"]: r["mb_per_s"] for r in rows if r["tool"] == "copy"}
    print(
        f"\n{'model':8} {'scheme':11} {'tool':10} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>11} "
        f"{'out MB':>8} {'MB/s':>7} {'vs copy':>7}"
    )
    for r in rows:
        ref = copy_tput.get(r["model"])
        frac = r["mb_per_s"] / ref if r["mb_per_s"] and ref else None
        line = (
            f"{r['model']:8} {r['scheme']:11} {r['tool']:10} {fmt(r['wall_s']):>8} "
            f"{fmt(r['cpu_s']):>8} {fmt(r['peak_rss_mb'], '.0f'):>11} "
            f"{fmt(r['out_mb'], '.1f'):>8} {fmt(r['mb_per_s'], '.0f'):>7} {fmt(frac):>7}"
        )
        print(line + (f"  failed: {r['error']}" if r["error"] else ""))
    by_key = {(r["model"], r["scheme"], r["tool"]): r for r in rows}
    for (model, scheme, tool), r in by_key.items():
        if tool != "llmpress" or r["error"]:
            continue
        for ref_tool in ("oneshot", "model_free"):
            ref = by_key.get((model, scheme, ref_tool))
            if ref and not ref["error"]:
                print(
                    f"{model} {scheme} llmpress/{ref_tool}: "
                    f"wall {r['wall_s'] / ref['wall_s']:.2f}x, "
                    f"CPU {r['cpu_s'] / ref['cpu_s']:.2f}x, "
                    f"RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x"
                )


def save_json(rows: list[dict[str, Any]], runs: list[Run], cold: bool) -> Path:
    """Merge into the results file so a run of one model keeps the other's figures.

    Rows are stamped with date and cache mode, since merged rows may come from other runs.
    """
    path = RESULTS_DIR / "datafree.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cache": "cold" if cold else "warm"}
    new_rows = [{**r, **stamp} for r in rows]
    new_runs = [{**asdict(r), **stamp} for r in runs]
    keys = {(r["model"], r["scheme"], r["tool"]) for r in rows}

    def fresh(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in entries if (r["model"], r["scheme"], r["tool"]) not in keys]

    data = {
        "meta": versions(),
        "summary": fresh(old.get("summary", [])) + new_rows,
        "runs": fresh(old.get("runs", [])) + new_runs,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--scheme", help=argparse.SUPPRESS)
    ap.add_argument("--group-size", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        WORKERS[args.worker](args.model, args.out, args.scheme, args.group_size)
        return

    tools = [t for t in args.tools.split(",") if t]
    runs: list[Run] = []
    for model in args.models.split(","):
        if model == "llama1b":
            build_llama1b(MODELS[model])
        if not (MODELS[model] / "config.json").exists():
            print(f"skip {model}: {MODELS[model]} not built", file=sys.stderr)
            continue
        jobs = [("-", "copy")] if "copy" in tools else []
        jobs += [(s, t) for s in args.schemes.split(",") for t in tools if t != "copy"]
        for scheme, tool in jobs:
            for _ in range(args.repeat):
                run = run_one(model, scheme, tool, args.cold)
                runs.append(run)
                print(
                    f"{model} {scheme} {tool}: wall {fmt(run.wall_s)} s, CPU {fmt(run.cpu_s)} s, "
                    f"peak RSS {fmt(run.peak_rss_mb, '.0f')} MB, load {run.load1}"
                    + (f", failed: {run.error}" if run.error else ""),
                    flush=True,
                )
    rows = summarize(runs)
    print_table(rows)
    print(f"\nwrote {save_json(rows, runs, args.cold)}")


if __name__ == "__main__":
    main()
