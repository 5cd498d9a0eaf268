"""`compress`: the one verb. Source -> plan -> layer by layer -> writer, for data-free schemes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from tqdm import tqdm

from llmpress import __version__
from llmpress.activations import ActivationCache
from llmpress.algorithms import Role, algorithms_of, by_role, parse_method, pruner_named
from llmpress.checkpoint import quantization_config, recipe_yaml
from llmpress.errors import LlmpressError
from llmpress.journal import Journal
from llmpress.memory import release_large_blocks_to_os
from llmpress.plan import CompressOptions, Plan, build_plan
from llmpress.quantize import check_finite, compress_layer
from llmpress.schemes import CALIBRATED
from llmpress.source import ModelSource
from llmpress.writer import RESUME_DIR, CheckpointWriter, partial_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressResult:
    output: Path
    input_bytes: int
    output_bytes: int
    seconds: float
    quantized_modules: int

    @property
    def ratio(self) -> float:
        return self.input_bytes / max(self.output_bytes, 1)


def compress(
    model: str | os.PathLike,
    output: str | os.PathLike,
    scheme: str | None = None,
    *,
    recipe: str | os.PathLike | dict | None = None,
    groups: list[dict] | None = None,
    targets: list[str] | tuple[str, ...] | None = None,
    ignore: list[str] | tuple[str, ...] | None = None,
    observer: str = "minmax",
    group_size: int | None = None,
    device: str = "cpu",
    compute_dtype: str | None = None,
    force: bool = False,
    max_shard_size: int = 2 * 1024**3,
    packing: str = "auto",
    dataset: str | None = None,
    num_samples: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
    kv_cache: str | None = None,
    progress: bool = True,
    resume: bool = False,
    max_memory: int | None = None,
    method: str | None = None,
    block_size: int | None = None,
    dampening_frac: float | None = None,
    actorder: str | None = None,
    offload_hessians: bool | None = None,
    propagate: str | None = None,
    independent: bool | None = None,
    smoothing_strength: float | None = None,
    duo_scaling: bool | None = None,
    awq_clip: bool | None = None,
    awq_grid: int | None = None,
    sparsity: float | list[float] | None = None,
    mask: str | None = None,
    sparsity_targets: list[str] | None = None,
    sparsity_ignore: list[str] | None = None,
) -> CompressResult:
    """Compress MODEL into a compressed-tensors checkpoint at OUTPUT, by a preset `scheme`,
    an llm-compressor `recipe` (a YAML file or text, or its parsed mapping), or mixed-precision
    `groups` (dicts of `scheme` or `args`, `targets`, `group_size`: llmpress.plan.SchemeGroup).

    Weights are quantized by round-to-nearest with a min-max or MSE observer, or with
    `method="gptq"` solved by GPTQ on calibration text (`block_size`, `dampening_frac`,
    `actorder` "static" | "group" | "none", `offload_hessians`), one decoder layer at a time;
    schemes with static activation scales run calibration text (`dataset`) through the layers.
    `method="awq"` (weight-only schemes) and `"smoothquant"`/`"smoothquant+gptq"` (W8A8, FP8)
    smooth each layer first (`smoothing_strength`: SmoothQuant's α; `duo_scaling`, `awq_grid`,
    `awq_clip`: AWQ's scale terms, exponents tried and clipping search).
    `propagate`: "compressed" (each layer calibrates on the outputs of the compressed layers
    before it; the default, but for AWQ) or "original" (on the original model's: one pass per
    layer; AWQ's default, as AutoAWQ and llm-compressor calibrate it).
    `independent`: with several modifiers (AWQ or SmoothQuant, then quantization), calibrate
    each on its own hidden states, as one run per modifier would, not all in one pass.
    Pruning: `method="sparsegpt"`, `"wanda"` or `"magnitude"` (with or without a `scheme`,
    whose quantization then rounds the pruned weights to nearest; "sparsegpt+gptq",
    "wanda+gptq", "magnitude+gptq": by GPTQ, zeros kept) zeroes `sparsity` of each weight (default 0.5; a list:
    one per decoder layer) in the `mask` structure ("unstructured" or "N:M", e.g. "2:4"), in
    the modules `sparsity_targets` / `sparsity_ignore` select (default: the run's).
    The input is never modified and OUTPUT appears only when complete; `resume` continues an interrupted calibrated run, `max_memory` bounds the bytes of
    calibration activations held in memory. `kv_cache` ("fp8", "fp8-head") adds FP8 KV-cache
    scales calibrated on `dataset`.
    """
    options = compress_options(
        scheme,
        recipe,
        groups=groups,
        targets=targets,
        ignore=ignore,
        observer=observer,
        group_size=group_size,
        device=device,
        compute_dtype=compute_dtype,
        max_shard_size=max_shard_size,
        packing=packing,
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        seed=seed,
        kv_cache=kv_cache,
        method=method,
        block_size=block_size,
        dampening_frac=dampening_frac,
        actorder=actorder,
        offload_hessians=offload_hessians,
        propagate=propagate,
        independent=independent,
        smoothing_strength=smoothing_strength,
        duo_scaling=duo_scaling,
        awq_clip=awq_clip,
        awq_grid=awq_grid,
        sparsity=sparsity,
        mask=mask,
        sparsity_targets=sparsity_targets,
        sparsity_ignore=sparsity_ignore,
    )
    return run(
        model,
        Path(output),
        options,
        force=force,
        progress=progress,
        resume=resume,
        max_memory=max_memory,
    )


def compress_options(scheme: str | None, recipe=None, **fields) -> CompressOptions:
    """Options from keyword arguments (None: the default) and/or a recipe (llmpress.recipe),
    with one-line validation errors."""
    for key in ("targets", "ignore", "groups", "sparsity_targets", "sparsity_ignore"):
        if fields.get(key) is not None:
            fields[key] = tuple(fields[key])
    if isinstance(fields.get("sparsity"), list):
        fields["sparsity"] = tuple(fields["sparsity"])
    _split_pruner(fields)
    if recipe is not None:
        from llmpress.recipe import read_recipe

        if scheme is not None:
            raise LlmpressError("give a scheme or a recipe, not both: the recipe names its scheme")
        from_recipe = read_recipe(recipe)
        both = [k for k in from_recipe if fields.get(k) is not None]
        if both:
            flag = "--" + both[0].replace("_", "-")
            raise LlmpressError(f"{flag} is set by the recipe too; drop one of the two")
        fields.update(from_recipe)
        scheme = fields.pop("scheme", None)
    elif scheme is None and not fields.get("groups") and not fields.get("prune"):
        raise LlmpressError(
            "give a scheme (e.g. W4A16; `llmpress schemes` lists them), a pruning method "
            "(--method sparsegpt, wanda or magnitude) or a recipe"
        )
    try:
        return CompressOptions(scheme=scheme, **{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "options"
        raise LlmpressError(f"{where}: {first['msg']} (got {first.get('input')!r})") from None


def _split_pruner(fields: dict) -> None:
    """`method` "sparsegpt", "wanda", "magnitude" (or "wanda+gptq"...): the pruning method,
    and what quantizes after it (round to nearest unless named)."""
    method = fields.get("method")
    if method is None:
        return
    parsed = parse_method(method)
    if parsed.pruner is not None:
        if fields.get("prune") is not None:
            raise LlmpressError("the pruning method is given twice")
        fields["prune"] = parsed.pruner.name
        fields["method"] = parsed.quantizing


# What a run holds besides its two resident layer groups: interpreter, torch, transformers and
# compressed-tensors (measured ~350 MB on 2.13/5.19/0.17), and a shard write buffer.
BASELINE_RSS_BYTES = 450 * 10**6
# Rough rate for the time estimate: measured 350-435 MB/s of input on 2 CPU cores (BENCHMARKS.md).
ESTIMATE_BYTES_PER_SECOND = 300 * 10**6


# Rough float32 matrix rate of calibration forward passes on 2 CPU cores (BENCHMARKS.md).
ESTIMATE_CALIBRATION_FLOPS = 60e9


def dry_run(
    model: str | os.PathLike, options: CompressOptions, max_memory: int | None = None
) -> dict:
    """What `run` would do, from headers and config alone: no weights are read, nothing is
    written. Fails as `run` would on a plan that cannot work (a static scheme without data)."""
    from llmpress.calibrate import checkpoint_dtype, compute_dtype, needs_calibration, stages_of

    source = ModelSource.open(model)
    plan = build_plan(source, options)
    kinds: dict[str, int] = {}
    for name in plan.modules:
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
    resident = [  # streamed tensors (embeddings, head) are held STREAM_BYTES at a time
        STREAM_BYTES if _streamed(source, plan, g) else sum(source.nbytes(n) for n in g)
        for g in source.tensors_by_layer()
    ]
    largest_two = sum(sorted(resident)[-2:])
    seconds = source.total_bytes / ESTIMATE_BYTES_PER_SECOND
    calibration = None
    activation_bytes = 0
    static = any(needs_calibration(g.scheme) for g in plan.groups)
    # GPTQ, AWQ, SmoothQuant, SparseGPT or Wanda observe the layers' inputs
    observed = any(a.needs for a in options.algorithms)
    if needs_data(plan, options):
        _require_dataset(options)
        tokens = options.num_samples * options.seq_len  # at most: short texts give fewer
        hidden = getattr(source.config, "hidden_size", 0)
        in_layers = sum(
            source.nbytes(n) // source.tensor_entries[n].dtype.itemsize
            for g in source.tensors_by_layer()
            for n in g
            if source.layer_of(n) is not None
        )
        # Passes per layer: observe inputs (static scales, Hessians), observe the KV cache,
        # run compressed; with propagate "original" or "sequential" one pass in all.
        # 2 flops per weight and token.
        propagate = _propagate(source, plan, options, max_memory)
        stages = stages_of(plan, options.independent, propagate)  # each its own passes
        two_pass = 1 + (static or observed) + (plan.kv_cache is not None)
        passes = sum(1 if stage.one_pass or stage.sequential else two_pass for stage in stages)
        seconds += passes * 2 * in_layers * tokens / ESTIMATE_CALIBRATION_FLOPS
        stored = checkpoint_dtype(source, plan)
        dtype = compute_dtype(options.device, stored, options.compute_dtype)
        # Hidden states in the compute dtype, two generations, of each stage.
        held = 2 * len(stages) * tokens * hidden * dtype.itemsize
        activation_bytes = held if max_memory is None else min(held, max_memory)
        if any(stage.sequential for stage in stages):  # the paused batches, all in memory
            activation_bytes = max(activation_bytes, sequential_bytes(source, plan, options))
        calibration = {
            "dataset": options.dataset,
            "samples": options.num_samples,
            "seq_len": options.seq_len,
            "seed": options.seed,
            "propagate": propagate or options.propagation,
            "max_tokens": tokens,
            "activation_bytes": held,
            "activation_bytes_in_memory": activation_bytes,
        }
    return {
        "model": str(source.path),
        "scheme": options.label,
        "kv_cache": options.kv_cache,
        "algorithm": " / ".join(options.method_names)
        + (" + static activation scales" if static else ""),
        "observer": options.observer,
        "quantized_modules": sum(plan.quantized(m) for m in plan.modules),
        "pruned_modules": len(plan.sparsity.modules) if plan.sparsity else 0,
        "modules_by_kind": kinds,
        "left_alone": list(plan.ignored),
        "input_bytes": source.total_bytes,
        "estimated_output_bytes": plan.estimated_output_bytes(source),
        "estimated_peak_rss_bytes": BASELINE_RSS_BYTES + largest_two + activation_bytes,
        "estimated_seconds": round(seconds, 1),
        "calibration": calibration,
    }


def run(
    model: str | os.PathLike,
    output: Path,
    options: CompressOptions,
    *,
    force: bool,
    progress: bool,
    resume: bool = False,
    max_memory: int | None = None,
) -> CompressResult:
    """`resume`: continue an interrupted calibrated run of the same command where its journal
    stopped (a fresh run when there is none); `max_memory`: bytes of calibration activations
    held in memory, the rest spilled to disk."""
    start = time.perf_counter()
    release_large_blocks_to_os()
    output = output.expanduser().resolve()
    _check_device(options.device)
    source = ModelSource.open(model)
    _check_output(source.path.resolve(), output, force)
    plan = build_plan(source, options)
    _check_space(output, plan.estimated_output_bytes(source))
    calibration = _calibration(source, plan, options)

    journal = record = None
    if calibration is not None:
        journal = Journal(
            partial_dir(output) / RESUME_DIR, _run_identity(source, options, calibration)
        )
        record = journal.load()
        if record is not None and not resume and not force:
            raise LlmpressError(
                f"an interrupted run of {output.name} stopped after {record['layers_done']} "
                "layers; pass --resume to continue it, or --force to start over"
            )
        if record is not None and resume:
            journal.check_same_run(record)
        else:
            record = None
    writer = CheckpointWriter(
        output,
        options.max_shard_size,
        list(source.tensor_files),
        resume=record and record["writer"],
    )
    keep_partial = False
    try:
        calibrated = None
        if calibration is not None:
            from llmpress.calibrate import StaticCalibration, stages_of

            propagate = _propagate(source, plan, options, max_memory)
            stages = stages_of(plan, options.independent, propagate)
            spill = partial_dir(output) / RESUME_DIR / "activations"
            # Each stage's hidden states apart, the memory budget shared out between them.
            budget = None if max_memory is None else max_memory // len(stages)
            folders = [spill] + [spill / f"stage-{k}" for k in range(1, len(stages))]
            if record is None:
                caches = [ActivationCache(f, budget) for f in folders]
            else:
                caches = [ActivationCache.reopen(f, record["generation"], budget) for f in folders]
            calibrated = StaticCalibration(
                source,
                plan,
                calibration,
                options.device,
                caches,
                resumed=record is not None,
                compute=options.compute_dtype,
                gptq=gptq_options(options),
                offload_hessians=options.offload_hessians,
                smoothing=smoothing_options(options),
                stages=stages,
            )
            if record is not None:
                for section, entries in record.get("report", {}).items():
                    calibrated.report.setdefault(section, {}).update(entries)
        pruned: dict[str, float] = {}  # data-free runs: each pruned module's zeros
        try:
            _write_tensors(
                source, plan, options, writer, progress, calibrated, journal, record, pruned
            )
        except KeyboardInterrupt:
            keep_partial = journal is not None and journal.load() is not None
            if keep_partial:
                print(
                    f"\ninterrupted; rerun the same command with --resume to continue "
                    f"(state kept in {writer.tmp_dir})",
                    file=sys.stderr,
                )
            raise
        finally:
            if calibrated is not None:
                calibrated.close()
        if calibrated is not None:
            pruned = calibrated.report.pop("sparsity", {})
        sparsity = sparsity_report(source, plan, pruned) if plan.sparsity else None
        config = _raw_config(source)
        if plan.groups or plan.kv_cache is not None:
            config["quantization_config"] = quantization_config(plan, options.layout, sparsity)
        # Pruned only: a plain dense model, which every reader loads (transformers refuses a
        # compressed-tensors config without config groups); the manifest tells the sparsity.
        extra = {"recipe.yaml": recipe_yaml(plan, options)}
        shards = writer.finish(config, source.passthrough_files(), extra)
        manifest = _manifest(source, plan, options, shards)
        if calibration is not None:
            manifest["calibration"] = calibration.to_json()
        if calibrated is not None:
            manifest.update((k, v) for k, v in calibrated.report.items() if v)
        if sparsity is not None:
            manifest["sparsity"] = sparsity
        writer.commit(manifest, force)
    except BaseException:
        if not keep_partial:
            writer.abort()
        raise
    out_bytes = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    return CompressResult(
        output,
        source.total_bytes,
        out_bytes,
        time.perf_counter() - start,
        sum(plan.quantized(m) for m in plan.modules),
    )


def sequential_bytes(source: ModelSource, plan: Plan, options: CompressOptions) -> int:
    """About the most a one-pass ("sequential") run holds of its paused batches: per token, a
    layer's input, its residual and normed states, the attention's or MLP's inner ones."""
    from llmpress.calibrate import checkpoint_dtype, compute_dtype

    config = source.config
    hidden = getattr(config, "hidden_size", 0)
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    stored = checkpoint_dtype(source, plan)
    dtype = compute_dtype(options.device, stored, options.compute_dtype)
    return options.num_samples * options.seq_len * (4 * hidden + inner) * dtype.itemsize


def _propagate(source: ModelSource, plan: Plan, options: CompressOptions, max_memory: int | None):
    """`options.propagate`, or "compressed" where the default would be one pass
    ("sequential") but its paused batches would not fit in `max_memory`; an explicit
    "sequential" that does not fit is refused."""
    if max_memory is None or options.propagation != "sequential":
        return options.propagate
    need = sequential_bytes(source, plan, options)
    if need <= max_memory:
        return options.propagate
    if options.propagate == "sequential":
        raise LlmpressError(
            f"--propagate sequential holds about {need / 1e6:,.0f} MB of paused activations, "
            f"over --max-memory {max_memory / 1e6:,.0f} MB: raise --max-memory or use "
            "--propagate compressed"
        )
    log.info("two passes per layer: one would hold %.0f MB, over --max-memory", need / 1e6)
    return "compressed"


def sparsity_report(source: ModelSource, plan: Plan, achieved: dict[str, float]) -> dict:
    """The manifest's account of the pruning: method, structure, and each pruned module's
    target and achieved fraction of zeros, with their average over all pruned weights."""
    sizes = {n: source.modules[n].weight.numel() for n in plan.sparsity.modules}
    missing = [n for n in sizes if n not in achieved]
    if missing:
        raise LlmpressError(f"internal: {missing[0]} was planned for pruning but not pruned")
    total = sum(sizes.values())
    return {
        "method": plan.sparsity.method,
        "structure": plan.sparsity.structure.label,
        "global_sparsity": round(sum(achieved[n] * sizes[n] for n in sizes) / total, 6),
        "modules": {
            n: {"target": plan.sparsity.modules[n], "achieved": achieved[n]} for n in sizes
        },
    }


# Unquantized tensors larger than this (embeddings, the output head) are copied through in
# pieces instead of being held whole: they are the largest tensors of most models.
STREAM_BYTES = 1 << 26


def _streamed(source: ModelSource, plan: Plan, group: list[str]) -> bool:
    """A loose unquantized tensor too large to hold whole: copied through in pieces."""
    return (
        len(group) == 1
        and group[0] not in plan.weight_names
        and source.nbytes(group[0]) > STREAM_BYTES
    )


def gptq_options(options: CompressOptions):
    """GPTQ's settings from the run's options, or None when weights are rounded to nearest."""
    if options.solver is None and not (options.pruner and options.pruner.solved):
        return None
    from llmpress.algorithms.gptq import GPTQOptions

    return GPTQOptions(options.block_size, options.dampening_frac, options.actorder)


def smoothing_options(options: CompressOptions):
    """AWQ's or SmoothQuant's settings, or None when the layers are not smoothed."""
    if options.smoother is None:
        return None
    from llmpress.algorithms.smoothing import SmoothingOptions

    return SmoothingOptions(
        options.smoother,
        options.smoothing_strength,
        duo_scaling=options.duo_scaling,
        grid=options.awq_grid,
        clip=options.awq_clip,
    )


def _require_dataset(options: CompressOptions) -> None:
    if options.dataset is not None:
        return
    pruner = options.pruner
    if pruner is not None and pruner.needs_data:
        free = " or ".join(p.name for p in by_role(Role.PRUNE) if not p.needs_data)
        raise LlmpressError(
            f"{pruner.needs_data}, computed from calibration text: give --dataset (e.g. "
            f"pydoc-calibration, or a .txt/.jsonl file), or prune by --method {free}"
        )
    if (algorithm := options.smoother or options.solver) is not None:
        what = algorithm.needs_data
    elif options.kv_cache and not any(
        (g.scheme or "").upper() in CALIBRATED for g in options.scheme_groups
    ):
        what = f"--kv-cache {options.kv_cache} quantizes keys and values with static scales"
    else:
        what = f"{options.label} quantizes activations with static scales"
    raise LlmpressError(
        f"{what}, computed from calibration text: give --dataset (e.g. "
        "pydoc-calibration, or a .txt/.jsonl file)"
    )


def needs_data(plan: Plan, options: CompressOptions) -> bool:
    """Whether the run calibrates on text: static activation scales, the KV cache, GPTQ, AWQ,
    SmoothQuant, SparseGPT or Wanda; round to nearest and magnitude pruning need none."""
    from llmpress.calibrate import needs_calibration

    static = any(needs_calibration(g.scheme) for g in plan.groups)
    pruning = plan.sparsity is not None and plan.sparsity.needs_data
    solving = any(a.needs_data for a in algorithms_of(options.methods))
    return static or pruning or plan.kv_cache is not None or solving


def _calibration(source: ModelSource, plan: Plan, options: CompressOptions):
    """The calibration samples a static-activation scheme needs, or None."""

    if not needs_data(plan, options):
        return None
    _require_dataset(options)
    from transformers import AutoTokenizer

    from llmpress.data import calibration_set

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:
        raise LlmpressError(f"{source.path} has no tokenizer to encode calibration text") from exc
    return calibration_set(
        options.dataset, tokenizer, options.num_samples, options.seq_len, options.seed
    )


def _run_identity(source: ModelSource, options: CompressOptions, calibration) -> dict:
    """What a resumed run must share with the interrupted one to continue its output."""
    return {
        "llmpress": __version__,
        "source": str(source.path.resolve()),
        "source_bytes": source.total_bytes,
        "options": options.model_dump(mode="json"),
        "calibration": calibration.fingerprint,
    }


def _write_tensors(
    source: ModelSource,
    plan: Plan,
    options: CompressOptions,
    writer: CheckpointWriter,
    progress: bool,
    calibrated=None,
    journal: Journal | None = None,
    record: dict | None = None,
    pruned: dict[str, float] | None = None,
) -> None:
    """One group (a decoder layer, or one loose tensor) in work at a time. `pruned`: where
    a data-free run records each module it prunes (by magnitude) and the zeros it has.

    The next group is read in a background thread while this one is quantized (file reads
    release the GIL), so disk and arithmetic overlap; at most two groups are resident.
    A calibrated run journals every finished group; `record` (a journal's last entry) skips
    the groups it lists as done.
    """
    weight_of = plan.weight_names
    groups = source.tensors_by_layer()
    streamed = [_streamed(source, plan, g) for g in groups]
    first = record["groups_done"] if record else 0
    layers_done = record["layers_done"] if record else 0
    if calibrated is not None:  # minutes per layer: count layers
        total = sum(source.layer_of(g[0]) is not None for g in groups)
        bar = tqdm(
            total=total, initial=layers_done, unit="layer", desc="calibrate", disable=not progress
        )
    else:
        bar = tqdm(
            total=source.total_bytes,
            unit="B",
            unit_scale=True,
            desc="compress",
            disable=not progress,
        )

    def prefetch(i: int):
        return None if i >= len(groups) or streamed[i] else reader.submit(source.read, groups[i])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmpress-read") as reader:
        pending = prefetch(first)
        for i in range(first, len(groups)):
            names = groups[i]
            layer = source.layer_of(names[0])
            if streamed[i]:
                _copy_through(source, names[0], writer)
                if calibrated is None:
                    bar.update(source.nbytes(names[0]))
                pending = prefetch(i + 1)
            else:
                tensors = pending.result()
                pending = prefetch(i + 1)
                nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
                to_quantize = {weight_of[n]: tensors.pop(n) for n in names if n in weight_of}
                for name, tensor in tensors.items():  # quantized weights: checked by observer
                    check_finite(name, tensor)
                packed = None
                if calibrated is not None and layer is not None:  # every layer, in order
                    packed = calibrated.compress(
                        layer, to_quantize, tensors, options.observer, options.layout
                    )
                elif to_quantize:
                    packed = {}
                    if plan.sparsity is not None:
                        packed |= _prune_data_free(to_quantize, plan, pruned)
                    for scheme, modules in plan.by_scheme(to_quantize):
                        packed |= compress_layer(
                            {m: to_quantize[m] for m in modules},
                            scheme,
                            plan.fused,
                            options.observer,
                            options.device,
                            options.layout,
                        )
                if packed and plan.sparsity is not None and calibrated is None:
                    _record_served_zeros(packed, plan, options, pruned)
                if packed:
                    tensors.update(
                        (f"{module}.{k}", v)
                        for module, state in packed.items()
                        for k, v in state.items()
                    )
                del to_quantize
                writer.add(tensors)
                del tensors
                bar.update(nbytes if calibrated is None else int(layer is not None))
            if journal is not None:
                layers_done += layer is not None
                journal.record(
                    i + 1, layers_done, calibrated.generation, writer.state(), calibrated.report
                )
    bar.close()


def _prune_data_free(weights: dict, plan: Plan, pruned: dict[str, float]) -> dict:
    """Magnitude pruning of a data-free run, in place in `weights`; returns the stored
    tensors of the modules only pruned (dense), and records each one's zeros in `pruned`."""
    from llmpress.sparsity import zero_fraction

    pruner = pruner_named(plan.sparsity.method)  # a data-free one: it needs no inputs

    stored = {}
    for name, weight in weights.items():
        if not plan.pruned(name):
            continue
        check_finite(f"{name}.weight", weight)
        mask = pruner.mask(weight, None, plan.sparsity.modules[name], plan.sparsity.structure)
        weights[name] = weight = weight.masked_fill(mask, 0)
        pruned[name] = round(zero_fraction(weight), 6)  # `_record_served_zeros` may add some
        if not plan.quantized(name):
            stored[name] = {"weight": weight}
    return stored


def _record_served_zeros(packed: dict, plan: Plan, options: CompressOptions, pruned: dict):
    """Each quantized pruned module's zeros as readers reconstruct its weight (rounding may
    add some to the pruned ones), where the installed compressed-tensors reads the layout."""
    from llmpress.calibrate import served_zeros
    from llmpress.packing import installed_layout

    if options.layout != installed_layout():
        return
    for name, state in packed.items():
        if plan.pruned(name) and plan.quantized(name):
            pruned[name] = served_zeros(state, plan.scheme_of(name))


def _copy_through(source: ModelSource, name: str, writer: CheckpointWriter) -> None:
    entry = source.tensor_entries[name]

    def checked():
        for chunk in source.read_chunks(name):
            check_finite(name, torch.frombuffer(chunk, dtype=entry.dtype))
            yield chunk

    writer.add_chunks(name, entry.dtype, entry.shape, entry.nbytes, checked())


def _raw_config(source: ModelSource) -> dict:
    """The input's config.json as written (keeps keys transformers would drop or rewrite)."""
    return json.loads((source.path / "config.json").read_text())


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LlmpressError(
            f"--device {device}: no CUDA device is available here; use --device cpu"
        )
    if not device.startswith(("cpu", "cuda")):
        raise LlmpressError(f"--device {device!r} is not supported; use cpu or cuda")


def _check_output(model_dir: Path, output: Path, force: bool) -> None:
    if output == model_dir or model_dir in output.parents or output in model_dir.parents:
        raise LlmpressError(
            f"output {output} overlaps the input model {model_dir}; choose a separate directory"
        )
    if output.exists() and not force:
        raise LlmpressError(f"{output} exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise LlmpressError(f"{output} exists and is not a directory")


def _check_space(output: Path, need: int) -> None:
    """Fail before the long part when the output cannot fit."""
    parent = output.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise LlmpressError(
            f"not enough space for the output in {parent}: {free / 1e6:,.1f} MB free, about "
            f"{need / 1e6:,.1f} MB needed; free space or choose another -o"
        )


def _manifest(source: ModelSource, plan: Plan, options: CompressOptions, shards: dict) -> dict:
    import compressed_tensors
    import transformers

    return {
        "tool": "llmpress",
        "llmpress_version": __version__,
        "versions": {
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "source": str(source.path),
        "source_bytes": source.total_bytes,
        "options": options.model_dump(mode="json"),
        "quantized_modules": len(plan.modules),
        "ignored_modules": list(plan.ignored),
        "shard_bytes": shards,
    }
