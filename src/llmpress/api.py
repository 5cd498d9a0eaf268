"""`compress`: the one verb. Source -> plan -> layer by layer -> writer, for data-free schemes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from llmpress.activations import ActivationCache
from llmpress.algorithms import parse_method
from llmpress.checkpoint import quantization_config, recipe_yaml
from llmpress.config import CompressOptions
from llmpress.errors import LlmpressError
from llmpress.estimate import propagate_within
from llmpress.journal import Journal
from llmpress.loop import write_tensors
from llmpress.manifest import build_manifest, run_identity, sparsity_report
from llmpress.memory import release_large_blocks_to_os
from llmpress.plan import Plan, build_plan
from llmpress.provenance.hashes import BackgroundHashes, tree_entries
from llmpress.source import ModelSource
from llmpress.stages import (
    needs_data,
    require_dataset,
    stages_of,
)
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
    force: bool = False,
    progress: bool = True,
    resume: bool = False,
    max_memory: int | None = None,
    **options,
) -> CompressResult:
    """Compress MODEL into a compressed-tensors checkpoint at OUTPUT, by a preset `scheme`,
    an llm-compressor `recipe` (a YAML file or text, or its parsed mapping), or mixed-precision
    `groups` (dicts of `scheme` or `args`, `targets`, `group_size`: llmpress.config.SchemeGroup).

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
    `options`: any field of llmpress.config.CompressOptions (`groups`, `targets`, `ignore`,
    `observer`, `group_size`, `device`, `method`, `dataset`...), each defined there once with
    its default; None or absent: the default (or the recipe's value).
    """
    return run(
        model,
        Path(output),
        compress_options(scheme, recipe, **options),
        force=force,
        progress=progress,
        resume=resume,
        max_memory=max_memory,
    )


def compress_options(scheme: str | None, recipe=None, **fields) -> CompressOptions:
    """Options from keyword arguments (None: the default) and/or a recipe (llmpress.recipe),
    with one-line validation errors."""
    unknown = sorted(set(fields) - set(CompressOptions.model_fields))
    if unknown:
        raise LlmpressError(
            f"unknown option {unknown[0]!r}; the options are "
            f"{', '.join(n for n in CompressOptions.model_fields if n != 'scheme')}"
        )
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
            partial_dir(output) / RESUME_DIR, run_identity(source, options, calibration)
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
    # The inputs' hashes, for the manifest: computed while the layers are compressed.
    inputs = BackgroundHashes(source.input_files())
    keep_partial = False
    try:
        calibrated = None
        if calibration is not None:
            from llmpress.calibrated_layers import CalibratedLayers

            propagate = propagate_within(source, plan, options, max_memory)
            stages = stages_of(plan, options.independent, propagate)
            spill = partial_dir(output) / RESUME_DIR / "activations"
            # Each stage's hidden states apart, the memory budget shared out between them.
            budget = None if max_memory is None else max_memory // len(stages)
            folders = [spill] + [spill / f"stage-{k}" for k in range(1, len(stages))]
            if record is None:
                caches = [ActivationCache(f, budget) for f in folders]
            else:
                caches = [ActivationCache.reopen(f, record["generation"], budget) for f in folders]
            calibrated = CalibratedLayers(
                source, plan, calibration, options, caches, record is not None, stages
            )
            if record is not None:
                for section, entries in record.get("report", {}).items():
                    calibrated.report.setdefault(section, {}).update(entries)
        pruned: dict[str, float] = {}  # data-free runs: each pruned module's zeros
        try:
            write_tensors(
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
        outputs = tree_entries(writer.tmp_dir)
        manifest = build_manifest(source, plan, options, shards, inputs.result(), outputs)
        if calibration is not None:
            manifest["calibration"] = calibration.to_json()
        if calibrated is not None:
            manifest.update((k, v) for k, v in calibrated.report.items() if v)
        if sparsity is not None:
            manifest["sparsity"] = sparsity
        writer.commit(manifest, force)
    except BaseException:
        inputs.cancel()
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


def _calibration(source: ModelSource, plan: Plan, options: CompressOptions):
    """The calibration samples a static-activation scheme needs, or None."""

    if not needs_data(plan, options):
        return None
    require_dataset(options)
    from transformers import AutoTokenizer

    from llmpress.data import calibration_set

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except Exception as exc:
        raise LlmpressError(f"{source.path} has no tokenizer to encode calibration text") from exc
    return calibration_set(
        options.dataset, tokenizer, options.num_samples, options.seq_len, options.seed
    )


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
