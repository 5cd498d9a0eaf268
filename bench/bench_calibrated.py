"""Calibrated compression side by side, llmpress vs llm-compressor: FP8 with static
activation scales (issue 4), GPTQ (issue 5, `--method gptq`), AWQ and SmoothQuant + GPTQ
(issue 6, `--method awq`, `--method smoothquant+gptq`), and pruning, alone or before
quantization (`--method sparsegpt`, `wanda`, `magnitude`).

Both tools calibrate SmolLM2-135M on the same token ids: llmpress' built-in
`pydoc-calibration` text, chosen and tokenized once here by `llmpress.data.calibration_set`
(BOS first, no padding), saved, and handed to llm-compressor as a tokenized `datasets.Dataset`
(batch 1, no shuffling, no padding, no truncation: it sees exactly these samples, in its own
order, longest first). llmpress selects them itself from `--dataset pydoc-calibration` with
the same arguments; the bench checks that its manifest fingerprint equals that of the saved
ids, and that the sequences llm-compressor fed to the model's embedding are the same ones.

Each tool runs as its own subprocess from its own environment (bench/setup_envs.sh):
llmpress from .venv-bench, llm-compressor (`oneshot`, its sequential pipeline, on CPU) from
.venv-anchor. Wall time, CPU time and peak RSS cover the whole process (imports, load,
calibrate, save). Both outputs are then scored by `llmpress eval` (held-out pydoc text:
perplexity, KL and top-1 agreement against the base) and checked for an `input_scale` on
every quantized Linear.

    .venv/bin/python bench/bench_calibrated.py                      # 128 x 512, the issue's run
    .venv/bin/python bench/bench_calibrated.py --num-samples 8 --seq-len 128   # a quick check
    .venv/bin/python bench/bench_calibrated.py --method gptq --scheme W4A16 --group-size 64

With `--method gptq` llm-compressor runs `GPTQModifier` with the same scheme (config groups
spelled out, so the group size is the same), block size, damping and activation order, and
the tool `rtn` (llmpress without calibration, round to nearest) gives the baseline to beat.
With `--method awq` llm-compressor runs `AWQModifier` then `QuantizationModifier` (0.14's
spelling), and with `--method smoothquant+gptq` `SmoothQuantModifier` then `GPTQModifier`;
`--anchor-method gptq` runs its GPTQ instead. Its AWQ pins cached activations for GPU copies,
which fails on a machine without an accelerator; the worker skips that pinning there (it moves
no number), so its AWQ runs on a CPU too:

    .venv/bin/python bench/bench_calibrated.py --method awq --anchor-method gptq --scheme W4A16 --group-size 64 --tools llmpress,oneshot,rtn
    .venv/bin/python bench/bench_calibrated.py --method smoothquant+gptq --scheme W8A8 --tools llmpress,oneshot,rtn

Pruning (`--method sparsegpt`, `wanda` or `magnitude`, with `--sparsity` (default 0.5) and
`--mask` (`unstructured`, the default, or N:M: N zeros in every M consecutive weights of a
row; N:M implies sparsity N/M)) prunes every Linear but lm_head; with no `--scheme` nothing
is quantized, with one both tools prune, then quantize in the same run. llm-compressor runs
`SparseGPTModifier` (or `WandaPruningModifier`: tool `oneshot-wanda`, or
`--anchor-method wanda`) with the same sparsity, mask, block size and damping, then
`QuantizationModifier` (round to nearest) when a scheme is given: 0.14 has no joint
prune-and-quantize solve like llmpress' sparsegpt, and its `GPTQModifier` does not keep the
pruned zeros; nor has it one-shot magnitude pruning. The tools `llmpress-sparsegpt`,
`llmpress-wanda` and `llmpress-magnitude` (and, with a scheme, `llmpress-wanda+gptq`,
`llmpress-magnitude+gptq`, `llmpress-sparsegpt+gptq`) run llmpress with that pruning method and otherwise the same
arguments, so one run gives the whole table; each output's achieved
sparsity (exact zeros over the decoder layers' Linear weights, as transformers loads it)
and, for N:M, whether every weight holds the pattern are reported and checked:

    .venv/bin/python bench/bench_calibrated.py --method sparsegpt --mask 2:4 --tools llmpress,llmpress-wanda,llmpress-magnitude,oneshot,oneshot-wanda
    .venv/bin/python bench/bench_calibrated.py --method sparsegpt --sparsity 0.5 --tools llmpress,llmpress-wanda,llmpress-magnitude,oneshot,oneshot-wanda
    .venv/bin/python bench/bench_calibrated.py --method sparsegpt --mask 2:4 --scheme FP8_DYNAMIC --tools llmpress,oneshot
    .venv/bin/python bench/bench_calibrated.py --method sparsegpt --mask 2:4 --scheme W4A16 --group-size 64 --tools llmpress,oneshot

`--dry-run` prints each tool's command and runs nothing.

Results: a markdown table on stdout, bench/results/calibrated.json (one entry per
samples x seq-len setting) and each run's log in bench/results/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    ANCHOR_PY,
    BENCH_CACHE,
    LLMPRESS,
    MB,
    RESULTS_DIR,
    ROOT,
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

DATASET = "pydoc-calibration"
PRUNERS = ("sparsegpt", "wanda", "magnitude")
ANCHOR_PRUNERS = ("sparsegpt", "wanda")  # llm-compressor's one-shot pruning modifiers
# llmpress-1pass: --propagate original; llmpress-2pass: --propagate compressed (the two passes
# per layer that SparseGPT and Wanda ran by default before "sequential");
# llmpress-PRUNER: that pruning method, else the same.
# llmpress-{sparsegpt,wanda,magnitude}+gptq: prune, then GPTQ (needs --scheme).
LLMPRESS_TOOLS = (
    "llmpress",
    "llmpress-1pass",
    "llmpress-2pass",
    *(f"llmpress-{p}" for p in (*PRUNERS, "sparsegpt+gptq", "wanda+gptq", "magnitude+gptq")),
)
PROPAGATION = {"llmpress": None, "llmpress-1pass": "original", "llmpress-2pass": "compressed"}
ONESHOT_TOOLS = ("oneshot", *(f"oneshot-{p}" for p in ANCHOR_PRUNERS))
TOOLS = (*LLMPRESS_TOOLS, *ONESHOT_TOOLS, "rtn")
EVAL_LLMPRESS = ROOT / ".venv" / "bin" / "llmpress"  # eval needs the dev env (lm-eval et al.)
GOALS = {"wall_s": 0.5, "peak_rss_mb": 1.0}  # llmpress / oneshot, issue 4


# ---------------------------------------------------------------- calibration ids


def calibration_ids(num_samples: int, seq_len: int, seed: int) -> tuple[Path, str]:
    """Choose and tokenize the samples once, as llmpress does, and save them.

    Returns the file and the sha256 of the ids read back from it, computed as llmpress
    computes its manifest fingerprint (`llmpress.data.fingerprint`).
    """
    import torch
    from transformers import AutoTokenizer

    from llmpress.data import calibration_set, fingerprint

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    calib = calibration_set(DATASET, tokenizer, num_samples, seq_len, seed)
    path = BENCH_CACHE / f"calib-{DATASET}-{num_samples}x{seq_len}-seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**calib.to_json(), "samples": [s.tolist() for s in calib.samples]}
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    saved = json.loads(path.read_text())["samples"]
    digest = fingerprint([torch.tensor(s, dtype=torch.int64) for s in saved])
    assert digest == calib.fingerprint, "the saved ids differ from the chosen ones"
    return path, digest


def same_ids(seen: list[list[int]], ids: list[list[int]]) -> str | None:
    """None when `seen` is `ids` fed whole some number of times (in any order), else why not."""
    if not seen:
        return "no sequences recorded at the embedding"
    passes, extra = divmod(len(seen), len(ids))
    want = Counter({tuple(s): n * passes for s, n in Counter(map(tuple, ids)).items()})
    if extra or Counter(map(tuple, seen)) != want:
        lens = sorted({len(s) for s in seen})
        return (
            f"{len(seen)} sequences seen (lengths {lens[0]}..{lens[-1]}), "
            f"not {len(ids)} samples x {max(passes, 1)} passes"
        )
    return None


# ---------------------------------------------------------------- worker (in .venv-anchor)


def _clock() -> tuple[float, float]:
    """Wall and process CPU seconds (all threads): CPU is steadier on a shared machine."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float], end: tuple[float, float]) -> list[float]:
    return [end[0] - start[0], end[1] - start[1]]


def work_oneshot(model_dir: str, out: str, ids_path: str, meta_path: str, recipe_path: str) -> None:
    """llm-compressor's documented calibrated path: load, oneshot with a dataset, save.

    Records the token ids that reach the embedding (which sequences it calibrated on), the
    time spent inside the decoder layers per pass (its sequential pipeline runs every layer
    twice: once observing, once propagating the quantized outputs) and the phases.
    """
    t0 = _clock()
    import torch
    from compressed_tensors.quantization import QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_import = _clock()
    calib = json.loads(Path(ids_path).read_text())
    ids = calib["samples"]
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t_load = _clock()

    spec = json.loads(Path(recipe_path).read_text())
    method = spec["method"]
    recipe: list[Any] = []
    if spec["scheme"] is not None:
        groups = {"group_0": QuantizationScheme.model_validate(spec["scheme"])}
        if method.endswith("gptq"):
            recipe = [GPTQModifier(config_groups=groups, ignore=["lm_head"], **spec["gptq"])]
        else:  # also after pruning: its GPTQ would not keep the pruned zeros
            recipe = [QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    if method in ("sparsegpt", "wanda"):
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

        prune = spec["prune"]
        common = {
            # ignored for N:M (it prunes N of every M), required all the same
            "sparsity": prune["sparsity"],
            "mask_structure": prune["mask_structure"],  # "0:0": unstructured
            "targets": ["Linear"],
            "ignore": ["re:.*lm_head"],
        }
        if method == "sparsegpt":
            recipe.insert(0, SparseGPTModifier(**common, **prune["sparsegpt"]))
        else:
            recipe.insert(0, WandaPruningModifier(**common))
    elif method.startswith("smoothquant"):
        from llmcompressor.modifiers.transform import SmoothQuantModifier

        recipe.insert(0, SmoothQuantModifier(smoothing_strength=spec["smoothing_strength"]))
    elif method == "awq":  # a transform in 0.14: it smooths, the next modifier quantizes
        from llmcompressor.modifiers.transform import AWQModifier

        recipe.insert(0, AWQModifier(duo_scaling=True))
        if not torch.accelerator.is_available():
            # Its AWQ pins its cached activations for faster host-to-GPU copies, which torch
            # refuses without an accelerator ("Cannot access accelerator device when none is
            # available"). Pinning moves no number; skipping it lets its AWQ run on a CPU.
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    seen: list[list[int]] = []

    def record_ids(_module, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        if type(x) is torch.Tensor:  # not the fx Proxy it gets while tracing
            seen.extend(x.reshape(-1, x.shape[-1]).tolist())

    # Per decoder layer, the wall and CPU seconds of each call, in call order.
    layer_calls: list[list[list[float]]] = [[] for _ in model.model.layers]
    starts: dict[int, tuple[float, float]] = {}

    def enter(i: int):
        return lambda *_: starts.__setitem__(i, _clock())

    def leave(i: int):
        return lambda *_: layer_calls[i].append(_since(starts.pop(i), _clock()))

    hooks = [model.get_input_embeddings().register_forward_pre_hook(record_ids, with_kwargs=True)]
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(enter(i)))
        hooks.append(layer.register_forward_hook(leave(i)))

    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(ids),
        max_seq_length=calib["seq_len"],
        batch_size=1,
        shuffle_calibration_samples=False,
        pipeline="sequential",
    )
    t_oneshot = _clock()
    for h in hooks:
        h.remove()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    t_save = _clock()

    n = len(ids)

    def total(calls: list[list[float]]) -> list[float]:
        return [sum(c[0] for c in calls), sum(c[1] for c in calls)]

    observe = total([c for layer in layer_calls for c in layer[:n]])
    propagate = total([c for layer in layer_calls for c in layer[n:]])
    in_oneshot = _since(t_load, t_oneshot)
    meta = {
        "phases": {
            "import": _since(t0, t_import),
            "load": _since(t_import, t_load),
            "oneshot": in_oneshot,
            "layers, observing pass": observe,
            "layers, propagating pass": propagate,
            "oneshot, outside layers": [
                in_oneshot[k] - observe[k] - propagate[k] for k in range(2)
            ],
            "save": _since(t_oneshot, t_save),
        },
        "calls_per_layer": sorted({len(c) for c in layer_calls}),
        "seen": seen,
    }
    Path(meta_path).write_text(json.dumps(meta))


# ---------------------------------------------------------------- measuring


@dataclass
class CalRun(Run):
    own_s: float | None = None  # the tool's own timer, where it prints one (after imports)
    phases: dict[str, list[float]] = field(default_factory=dict)  # oneshot: [wall, CPU] s
    ids_check: str | None = None  # None: consumed exactly the saved ids


def mask_nm(mask: str) -> tuple[int, int]:
    """(N, M) of an "N:M" mask: N zeros in every M consecutive weights of a row; (0, 0) for
    unstructured (llm-compressor's "0:0")."""
    if mask in ("unstructured", "0:0"):
        return 0, 0
    found = re.fullmatch(r"(\d+):(\d+)", mask)
    if not found or not 0 < int(found[1]) < int(found[2]):
        raise ValueError(f"--mask {mask!r}: unstructured, or N:M with 0 < N < M (e.g. 2:4)")
    return int(found[1]), int(found[2])


def prunes(method: str) -> bool:
    return method.split("+")[0] in PRUNERS


def tool_method(tool: str, args: argparse.Namespace) -> str:
    """The method a tool runs: --method (--anchor-method for oneshot), or its name's suffix."""
    if tool in PROPAGATION:
        return args.method
    if tool == "oneshot":
        return args.anchor_method or args.method
    if tool == "rtn":
        return "rtn"
    return tool.split("-", 1)[1]  # llmpress-wanda, oneshot-sparsegpt, ...


def calibrates(tool: str, args: argparse.Namespace) -> bool:
    """Whether the tool reads the calibration ids: all but rtn, and magnitude pruning unless
    its scheme needs static activation scales."""
    if tool == "rtn":
        return False
    if tool in LLMPRESS_TOOLS and tool_method(tool, args) == "magnitude":
        return args.scheme is not None and static_inputs(args.scheme)
    return True


def recipe_spec(tool: str, args: argparse.Namespace) -> Path:
    """The scheme (as llmpress builds it, group size included; None: prune only), the GPTQ
    and the pruning settings, for the llm-compressor worker: both tools compress alike."""
    from llmpress.schemes import build_scheme

    scheme = build_scheme(args.scheme, ["Linear"], args.group_size) if args.scheme else None
    spec = {
        "scheme": scheme and scheme.model_dump(mode="json", exclude_none=True),
        "method": tool_method(tool, args),
        "smoothing_strength": 0.5,
        "gptq": {
            "block_size": args.block_size,
            "dampening_frac": args.dampening_frac,
            "actorder": None if args.actorder == "none" else args.actorder,
        },
        "prune": {
            "sparsity": args.sparsity,
            "mask_structure": "0:0" if mask_nm(args.mask) == (0, 0) else args.mask,
            "sparsegpt": {"block_size": args.block_size, "dampening_frac": args.dampening_frac},
        },
    }
    path = BENCH_CACHE / f"recipe-{tool}.json"
    path.write_text(json.dumps(spec))
    return path


def _scheme_flags(args: argparse.Namespace) -> list[str]:
    if args.scheme is None:
        return []
    flags = ["--scheme", args.scheme]
    if args.group_size:
        flags += ["--group-size", str(args.group_size)]
    return flags


def command(tool: str, out: Path, args: argparse.Namespace, ids_path: Path) -> list[str]:
    if tool == "rtn":
        return [str(LLMPRESS), "compress", str(SMOLLM2), "-o", str(out), *_scheme_flags(args)] + [
            "--quiet",
            "--force",
        ]
    if tool in LLMPRESS_TOOLS:
        name = tool_method(tool, args)
        method = ["--propagate", PROPAGATION[tool]] if PROPAGATION.get(tool) else []
        method += shlex.split(args.llmpress_flags)
        if name != "rtn":
            method += ["--method", name]
        if name.endswith("gptq"):
            method += ["--actorder", args.actorder]
            method += ["--block-size", str(args.block_size)]
            method += ["--dampening-frac", str(args.dampening_frac)]
        if prunes(name):
            method += ["--mask", args.mask]
            if mask_nm(args.mask) == (0, 0):  # N:M implies its sparsity, N / M
                method += ["--sparsity", str(args.sparsity)]
            if name == "sparsegpt":  # llmpress' defaults unless asked: 128 and 0.01
                if args.block_size != 128:
                    method += ["--block-size", str(args.block_size)]
                if args.dampening_frac != 0.01:
                    method += ["--dampening-frac", str(args.dampening_frac)]
        data = []
        if calibrates(tool, args):
            data = ["--dataset", DATASET, "--num-samples", str(args.num_samples)]
            data += ["--seq-len", str(args.seq_len), "--seed", str(args.seed)]
        return [
            str(LLMPRESS),
            "compress",
            str(SMOLLM2),
            "-o",
            str(out),
            *_scheme_flags(args),
            *method,
            *data,
            "--quiet",
            "--force",
        ]
    return [
        str(ANCHOR_PY),
        str(Path(__file__).resolve()),
        "--worker",
        "oneshot",
        "--model",
        str(SMOLLM2),
        "--out",
        str(out),
        "--ids",
        str(ids_path),
        "--meta",
        str(out.with_name("meta.json")),
        "--recipe",
        str(recipe_spec(tool, args)),
    ]


def check_ids(
    tool: str, out: Path, ids: list[list[int]], digest: str, args: argparse.Namespace
) -> str | None:
    """None when the run calibrated on exactly the saved ids (or calibrates on none), else
    what differs."""
    if not calibrates(tool, args):
        return None
    if tool in LLMPRESS_TOOLS:
        manifest = json.loads((out / "llmpress.json").read_text())
        got = manifest.get("calibration", {}).get("sha256")
        return None if got == digest else f"manifest sha256 {got} != saved ids' {digest}"
    meta = json.loads(out.with_name("meta.json").read_text())
    return same_ids(meta["seen"], ids)


def run_label(args: argparse.Namespace) -> str:
    """The method, mask, sparsity and scheme of this invocation (an N:M mask as is)."""
    label = args.method
    if args.method in PRUNERS:
        label += f"-{args.mask}-s{args.sparsity:g}"
    return f"{label}-{args.scheme or 'dense'}"


def run_one(
    tool: str, args: argparse.Namespace, ids_path: Path, digest: str
) -> tuple[CalRun, Path | None]:
    """One timed run; its output directory is returned (None on failure) for the checks."""
    in_bytes = sum(f.stat().st_size for f in SMOLLM2.glob("*.safetensors"))
    run = CalRun("smollm2", args.scheme or "dense", tool, round(in_bytes / MB, 1))
    prepare_cache(SMOLLM2, cold=False)
    run.load1 = round(os.getloadavg()[0], 2)
    (BENCH_CACHE / "tmp").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=BENCH_CACHE / "tmp"))  # same disk as the input
    out = tmp / "out"
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    label = run_label(args).replace(":", "of")  # 2:4 -> 2of4
    log = logs / f"calibrated-{label}-{args.num_samples}x{args.seq_len}-{tool}.log"
    try:
        wall, cpu, peak, rc = measure(command(tool, out, args, ids_path), tmp, log)
    except OSError as exc:  # e.g. an environment is missing: bash bench/setup_envs.sh
        run.error = str(exc)[:200]
        shutil.rmtree(tmp, ignore_errors=True)
        return run, None
    if rc != 0:
        run.error = last_error(log)
        shutil.rmtree(tmp, ignore_errors=True)
        return run, None
    run.wall_s, run.cpu_s = round(wall, 2), round(cpu, 2)
    run.peak_rss_mb = round(peak / MB, 1)
    run.out_mb = round(dir_bytes(out) / MB, 1)
    if tool in (*LLMPRESS_TOOLS, "rtn"):
        m = re.search(r" in ([\d.]+) s\s*$", log.read_text(errors="replace"))
        run.own_s = float(m.group(1)) if m else None
    else:
        meta = json.loads(out.with_name("meta.json").read_text())
        run.phases = {k: [round(x, 2) for x in v] for k, v in meta["phases"].items()}
        run.own_s = round(run.phases["oneshot"][0] + run.phases["save"][0], 2)
    ids = json.loads(ids_path.read_text())["samples"]
    run.ids_check = check_ids(tool, out, ids, digest, args)
    return run, out


# ---------------------------------------------------------------- quality and checks


def evaluate(out: Path, windows: int) -> dict[str, Any]:
    """`llmpress eval OUT --base SmolLM2 --json -`, from the dev environment."""
    cmd = [str(EVAL_LLMPRESS), "eval", str(out), "--base", str(SMOLLM2), "--json", "-"]
    cmd += ["--windows", str(windows), "--device", "cpu", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines() or ["no output"]
        return {"error": lines[-1][:200]}
    return json.loads(res.stdout)


def scale_tensors(out: Path) -> dict[str, dict[str, float]]:
    """Per quantized module (one with a weight_scale): its weight and input scales."""
    from safetensors import safe_open

    found: dict[str, dict[str, float]] = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                module, _, name = key.rpartition(".")
                if name in ("weight_scale", "input_scale"):
                    # grouped scales: their mean magnitude, enough to compare the tools
                    value = f.get_tensor(key).float().abs().mean().item()
                    found.setdefault(module, {})[name] = value
    return found


def static_inputs(scheme: str) -> bool:
    from llmpress.schemes import build_scheme
    from llmpress.stages import needs_calibration

    return needs_calibration(build_scheme(scheme, ["Linear"]))


def scale_check(scales: dict[str, dict[str, float]]) -> dict[str, Any]:
    """How many quantized modules (those with a weight_scale) carry an input_scale."""
    quantized = [m for m, s in scales.items() if "weight_scale" in s]
    missing = [m for m in quantized if "input_scale" not in scales[m]]
    return {
        "quantized": len(quantized),
        "with_input_scale": len(quantized) - len(missing),
        "missing_input_scale": missing[:5],
    }


def compare_scales(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> dict:
    """|a/b - 1| over the modules both quantized, per scale kind: median, max and where."""
    result: dict[str, Any] = {}
    for name in ("weight_scale", "input_scale"):
        rel = {
            m: abs(a[m][name] / b[m][name] - 1)
            for m in sorted(a.keys() & b.keys())
            if name in a[m] and name in b[m] and b[m][name]
        }
        if rel:
            worst = max(rel, key=rel.__getitem__)
            result[name] = {
                "modules": len(rel),
                "median_rel_diff": statistics.median(rel.values()),
                "max_rel_diff": rel[worst],
                "max_at": worst,
                "by_module": rel,
            }
    return result


def sparsity_check(out: Path, mask: str) -> dict[str, Any]:
    """Exact zeros in the Linear weights of the decoder layers (those both tools prune), as
    transformers loads them (a compressed checkpoint decompressed: a quantized zero is an
    exact zero), and, for an N:M mask, the blocks of M consecutive weights of a row (along
    the input) that hold fewer than N zeros."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    n, m = mask_nm(mask)
    # compressed-tensors' progress bars (tqdm, to stderr) would flood the report
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        model = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
        with torch.inference_mode():
            # transformers decompresses a compressed-tensors checkpoint on the first forward
            model(torch.zeros((1, 1), dtype=torch.int64))
    zeros = params = bad_blocks = blocks = weights_ok = 0
    fractions: dict[str, float] = {}
    first_bad = None
    for i, layer in enumerate(model.model.layers):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            key = f"model.layers.{i}.{name}"
            w = module.weight.detach()
            is_zero = w == 0
            count = int(is_zero.sum())
            zeros += count
            params += w.numel()
            fractions[key] = count / w.numel()
            if m:
                rows, columns = w.shape
                if columns % m:
                    bad = rows * -(-columns // m)
                else:
                    bad = int((is_zero.reshape(rows, columns // m, m).sum(2) < n).sum())
                    blocks += rows * columns // m
                bad_blocks += bad
                weights_ok += not bad
                first_bad = first_bad or (key if bad else None)
    del model
    lo = min(fractions, key=fractions.__getitem__)
    hi = max(fractions, key=fractions.__getitem__)
    result: dict[str, Any] = {
        "weights": len(fractions),
        "params": params,
        "zeros": zeros,
        "sparsity": zeros / params,
        "min": fractions[lo],
        "min_at": lo,
        "max": fractions[hi],
        "max_at": hi,
    }
    if m:
        result["n_m"] = {
            "mask": mask,
            "weights_ok": weights_ok,
            "bad_blocks": bad_blocks,
            "blocks": blocks,
            "first_bad": first_bad,
        }
    return result


# ---------------------------------------------------------------- reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _sparsity_cells(sp: dict[str, Any] | None) -> list[str]:
    if not sp:
        return ["-", "-"]
    nm = sp.get("n_m")
    if nm is None:
        return [f"{sp['sparsity']:.4f}", "-"]
    verdict = "yes" if nm["bad_blocks"] == 0 else f"NO ({nm['bad_blocks']} blocks)"
    return [f"{sp['sparsity']:.4f}", f"{verdict}, {nm['weights_ok']}/{sp['weights']}"]


def reference(tool: str, tools: list[str], args: argparse.Namespace) -> str:
    """The oneshot run to compare an llmpress run with: one with the same method, else oneshot."""
    same = [
        t for t in ONESHOT_TOOLS if t in tools and tool_method(t, args) == tool_method(tool, args)
    ]
    return same[0] if same else "oneshot"


def print_report(
    rows: list[dict[str, Any]],
    quality: dict[str, Any],
    checks: dict[str, Any],
    sparsity: dict[str, Any],
    phases: dict[str, list[float]],
    cmdline: str,
    args: argparse.Namespace,
) -> None:
    print(f"\n```bash\n{cmdline}\n```\n")
    pruning = any(prunes(tool_method(r["tool"], args)) for r in rows)
    head = (
        "| tool | wall s | CPU s | peak RSS MB | out MB | own s | perplexity | KL nats/tok "
        "| top-1 agree | input_scale |"
    )
    if pruning:
        head += (
            f" sparsity | {args.mask} in every weight |" if mask_nm(args.mask)[1] else " sparsity |"
        )
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    base = next((q for q in quality.values() if q.get("base_perplexity")), None)
    if base:
        empty = " |" * (head.count("|") - 10)
        print(f"| base (bf16) | | | | | | {base['base_perplexity']:.3f} | 0 | 1 |" + empty)
    for r in rows:
        q = quality.get(r["tool"], {})
        sc = checks.get(r["tool"])
        cells = [
            r["tool"] + (f" ({tool_method(r['tool'], args)})" if pruning else ""),
            fmt(r["wall_s"]),
            fmt(r["cpu_s"]),
            fmt(r["peak_rss_mb"], ".0f"),
            fmt(r["out_mb"], ".1f"),
            fmt(r["own_s"]),
            fmt(q.get("perplexity"), ".3f"),
            fmt(q.get("kl_divergence"), ".4f"),
            fmt(q.get("top1_agreement"), ".3f"),
            f"{sc['with_input_scale']}/{sc['quantized']}" if sc and sc["quantized"] else "-",
        ]
        if pruning:
            sp_cells = _sparsity_cells(sparsity.get(r["tool"]))
            cells += sp_cells if mask_nm(args.mask)[1] else sp_cells[:1]
        note = f" failed: {r['error']}" if r["error"] else ""
        note += f" eval failed: {q['error']}" if q.get("error") else ""
        print("| " + " | ".join(cells) + " |" + note)
    print(
        "\nown s: the tool's time after its imports (llmpress' own timer; for oneshot, "
        "oneshot() + save_pretrained). input_scale: quantized Linears that have one."
    )
    if pruning:
        print(
            "sparsity: exact zeros over the Linear weights of the decoder layers, as "
            "transformers loads the output (decompressed)"
            + (
                f"; {args.mask} in every weight: whether every block of "
                f"{mask_nm(args.mask)[1]} consecutive weights of a row holds >= "
                f"{mask_nm(args.mask)[0]} zeros, and the weights that pass."
                if mask_nm(args.mask)[1]
                else "."
            )
        )
    by_tool = {r["tool"]: r for r in rows if not r["error"]}
    for name in LLMPRESS_TOOLS:
        ref_name = reference(name, list(by_tool), args)
        lp, ref = by_tool.get(name), by_tool.get(ref_name)
        if not (lp and ref):
            continue
        parts = []
        for key, label in (("wall_s", "wall"), ("cpu_s", "CPU"), ("peak_rss_mb", "peak RSS")):
            ratio = _ratio(lp[key], ref[key])
            goal = GOALS.get(key)
            verdict = ""
            if goal is not None and ratio is not None:
                verdict = f" (goal <= {goal}x: {'met' if ratio <= goal else 'NOT met'})"
            parts.append(f"{label} {fmt(ratio)}x{verdict}")
        ppl = _ratio(
            quality.get(name, {}).get("perplexity"), quality.get(ref_name, {}).get("perplexity")
        )
        if ppl is not None:
            parts.append(f"perplexity {ppl:.3f}x")
        if tool_method(name, args) != tool_method(ref_name, args):
            parts.append(f"{ref_name} runs {tool_method(ref_name, args)}")
        print(f"{name} / {ref_name}: " + ", ".join(parts))
    if phases:
        parts = [f"{k} {w:.2f}/{c:.2f}" for k, (w, c) in phases.items()]
        print("oneshot phases, wall/CPU s: " + "; ".join(parts))
    for name, d in checks.get("llmpress vs oneshot", {}).items():
        print(
            f"{name}, llmpress vs oneshot, {d['modules']} modules: "
            f"|ratio - 1| median {d['median_rel_diff']:.2e}, "
            f"max {d['max_rel_diff']:.2e} ({d['max_at']})"
        )
    for tool, sp in sparsity.items():
        print(
            f"{tool} sparsity: {sp['zeros']}/{sp['params']} zeros in {sp['weights']} weights, "
            f"per weight {sp['min']:.4f} ({sp['min_at']}) .. {sp['max']:.4f} ({sp['max_at']})"
            + (
                f"; first {args.mask} miss: {sp['n_m']['first_bad']}"
                if sp.get("n_m", {}).get("first_bad")
                else ""
            )
        )


def check_args(args: argparse.Namespace, tools: list[str]) -> None:
    """Settle --scheme and --sparsity, and refuse what a tool cannot run."""
    try:
        n, m = mask_nm(args.mask)
    except ValueError as exc:
        sys.exit(str(exc))
    if m:
        if args.sparsity is not None and abs(args.sparsity - n / m) > 1e-9:
            sys.exit(f"--mask {args.mask} prunes {n / m:g} of each weight: drop --sparsity")
        args.sparsity = n / m
    elif args.sparsity is None:
        args.sparsity = 0.5
    if not 0 < args.sparsity < 1:
        sys.exit(f"--sparsity {args.sparsity}: a fraction between 0 and 1")
    if args.scheme is None and args.method not in PRUNERS:
        args.scheme = "FP8"
    for tool in tools:
        method = tool_method(tool, args)
        if args.scheme is None and method not in PRUNERS:  # wanda+gptq quantizes too
            sys.exit(f"{tool} ({method}) quantizes: give --scheme")
        if tool in ONESHOT_TOOLS and method == "magnitude":
            sys.exit(
                "llm-compressor 0.14 has no one-shot magnitude pruning (MagnitudePruningModifier "
                "applies its masks only at optimizer steps): give --anchor-method sparsegpt or "
                "wanda, or leave oneshot out"
            )


def save_json(setting: str, entry: dict[str, Any]) -> Path:
    """One entry per samples x seq-len setting, so a quick run keeps the full run's figures."""
    path = RESULTS_DIR / "calibrated.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[setting] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tools", default="llmpress,oneshot", help=f"of {', '.join(TOOLS)}")
    ap.add_argument(
        "--scheme", help="FP8 unless pruning; with a pruning --method: prune, then quantize"
    )
    ap.add_argument("--group-size", type=int)
    methods = ["rtn", "gptq", "awq", "smoothquant+gptq"]
    ap.add_argument("--method", choices=[*methods, *PRUNERS], default="rtn")
    ap.add_argument(
        "--anchor-method",
        choices=[*methods, *ANCHOR_PRUNERS],
        help="llm-compressor's method when it differs (its AWQ cannot run on a CPU: gptq)",
    )
    ap.add_argument(
        "--sparsity",
        type=float,
        help="pruning: fraction of each weight zeroed (default 0.5; N:M implies N/M)",
    )
    ap.add_argument(
        "--mask",
        default="unstructured",
        help="pruning: unstructured, or N:M (N zeros in every M consecutive weights of a row)",
    )
    ap.add_argument("--llmpress-flags", default="", help="more flags for llmpress' runs")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dampening-frac", type=float, default=0.01)
    ap.add_argument("--actorder", default="static", choices=["static", "group", "none"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=16, help="0 skips the evaluation")
    ap.add_argument("--keep", type=Path, help="move each tool's first output to KEEP/TOOL")
    ap.add_argument("--dry-run", action="store_true", help="print each tool's command, run none")
    ap.add_argument("--worker", choices=["oneshot"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--meta", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        work_oneshot(args.model, args.out, args.ids, args.meta, args.recipe)
        return

    python = os.path.relpath(sys.executable, ROOT)
    cmdline = shlex.join([python, os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    if not (SMOLLM2 / "config.json").exists():
        sys.exit(f"{SMOLLM2} is missing: see DESIGN.md (test fixtures) for how it is built")
    tools = [t for t in args.tools.split(",") if t]
    if unknown := set(tools) - set(TOOLS):
        sys.exit(f"unknown tools {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    check_args(args, tools)
    ids_path, digest = calibration_ids(args.num_samples, args.seq_len, args.seed)
    tokens = sum(map(len, json.loads(ids_path.read_text())["samples"]))
    print(f"calibration: {args.num_samples} samples, {tokens} tokens, sha256 {digest[:16]}…")
    if args.dry_run:
        for tool in tools:
            out = BENCH_CACHE / "tmp" / tool / "out"
            print(
                f"{tool} ({tool_method(tool, args)}): {shlex.join(command(tool, out, args, ids_path))}"
            )
            if tool in ONESHOT_TOOLS:
                print(f"  recipe: {recipe_spec(tool, args).read_text()}")
        return

    pruning = any(prunes(tool_method(t, args)) for t in tools)
    runs: list[CalRun] = []
    kept: dict[str, Path] = {}  # the first good output of each tool, for eval and checks
    try:
        for _ in range(args.repeat):  # interleaved, so drifting machine speed hits both
            for tool in tools:
                run, out = run_one(tool, args, ids_path, digest)
                runs.append(run)
                if out is not None and tool in kept:
                    shutil.rmtree(out.parent, ignore_errors=True)
                elif out is not None:
                    kept[tool] = out
                ids_note = "same ids" if run.ids_check is None else f"IDS DIFFER: {run.ids_check}"
                print(
                    f"{tool}: wall {fmt(run.wall_s)} s, CPU {fmt(run.cpu_s)} s, "
                    f"peak RSS {fmt(run.peak_rss_mb, '.0f')} MB, load {run.load1}"
                    + (f", failed: {run.error}" if run.error else f", {ids_note}"),
                    flush=True,
                )
        quality: dict[str, Any] = {}
        checks: dict[str, Any] = {}
        sparsity: dict[str, Any] = {}
        scales = {tool: scale_tensors(out) for tool, out in kept.items()}
        for tool, out in kept.items():
            checks[tool] = scale_check(scales[tool])
            if args.eval_windows:
                print(f"evaluating {tool}'s output ...", flush=True)
                quality[tool] = evaluate(out, args.eval_windows)
        if {"llmpress", "oneshot"} <= kept.keys():
            checks["llmpress vs oneshot"] = compare_scales(scales["llmpress"], scales["oneshot"])
        if pruning:
            for tool, out in kept.items():
                print(f"counting zeros in {tool}'s output ...", flush=True)
                sparsity[tool] = sparsity_check(out, args.mask)
    finally:
        for tool, out in kept.items():
            if args.keep:
                shutil.rmtree(args.keep / tool, ignore_errors=True)
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.move(out, args.keep / tool)
            shutil.rmtree(out.parent, ignore_errors=True)

    rows = summarize(runs)
    for row in rows:
        good = [r for r in runs if r.tool == row["tool"] and not r.error]
        row["own_s"] = min((r.own_s for r in good if r.own_s), default=None)
        row["ids_check"] = next((r.ids_check for r in good if r.ids_check), None)
    # The phases of oneshot's fastest run (of the first oneshot tool).
    first = next((t for t in tools if t in ONESHOT_TOOLS), None)
    phases = min(
        (r.phases for r in runs if r.phases and r.tool == first),
        key=lambda p: p["oneshot"][0],
        default={},
    )
    print_report(rows, quality, checks, sparsity, phases, cmdline, args)
    entry = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": cmdline,
        "scheme": args.scheme,
        "method": args.method,
        "anchor_method": args.anchor_method or args.method,
        "llmpress_flags": args.llmpress_flags,
        "group_size": args.group_size,
        "actorder": args.actorder,
        "pruning": {"sparsity": args.sparsity, "mask": args.mask} if pruning else None,
        "calibration": {
            "dataset": DATASET,
            "samples": args.num_samples,
            "seq_len": args.seq_len,
            "seed": args.seed,
            "tokens": tokens,
        },
        "sha256": digest,
        "meta": versions(),
        "summary": rows,
        "quality": quality,
        "checks": checks,
        "sparsity": sparsity,
        "oneshot_phases": phases,
        "runs": [asdict(r) for r in runs],
    }
    setting = f"{args.num_samples}x{args.seq_len}-seed{args.seed}"
    if args.method in PRUNERS:
        setting = f"{run_label(args)}-g{args.group_size}-{setting}"
        if args.anchor_method and args.anchor_method != args.method:
            setting += f"-anchor-{args.anchor_method}"
    elif args.method != "rtn" or args.scheme != "FP8":
        setting = f"{args.method}-{args.scheme}-g{args.group_size}-{args.actorder}-{setting}"
        if args.anchor_method and args.anchor_method != args.method:
            setting += f"-anchor-{args.anchor_method}"
    if args.llmpress_flags:
        setting += " " + args.llmpress_flags
    print(f"\nwrote {save_json(setting, entry)}")
    problems = [f"{r.tool} calibrated on other ids: {r.ids_check}" for r in runs if r.ids_check]
    problems += [
        f"{tool}: {sp['n_m']['bad_blocks']} blocks break {args.mask}, first in "
        f"{sp['n_m']['first_bad']}"
        for tool, sp in sparsity.items()
        if prunes(tool_method(tool, args)) and sp.get("n_m", {}).get("bad_blocks")
    ]
    problems += (
        []
        if args.scheme is None or not static_inputs(args.scheme)
        else [
            f"{tool}: no input_scale on {', '.join(c['missing_input_scale'])}"
            for tool, c in checks.items()
            if c.get("missing_input_scale")
        ]
    )
    if problems:
        sys.exit("\n".join(problems))


if __name__ == "__main__":
    main()
