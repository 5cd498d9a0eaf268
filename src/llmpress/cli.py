"""`llmpress` command line: compress, schemes, inspect. Flags become `CompressOptions`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from llmpress.errors import LlmpressError


class _MethodChoice(click.Choice):
    """--method's choices, read from the algorithm registry each time they are needed: an
    algorithm registered after this module is imported (a plugin's) is offered too."""

    def __init__(self):
        super().__init__([])

    @property
    def choices(self) -> tuple[str, ...]:
        from llmpress.algorithms import method_choices

        return tuple(method_choices())

    @choices.setter
    def choices(self, value) -> None:  # noqa: ANN001 - click's __init__ sets them
        pass


def _print_smoothing(report: dict) -> None:
    sites = report.get("sites", {})
    click.echo(f"  {report['method']}: {len(sites)} sites smoothed")
    for mapping in report["mappings"]:
        click.echo(f"    {mapping}")
    for reason in report.get("skipped", []):
        click.echo(f"    skipped {reason}")
    searched = [s for s in sites.values() if "loss" in s]
    if searched:
        gain = sum(s["loss"] for s in searched) / max(sum(s["loss_rtn"] for s in searched), 1e-30)
        kept = sum(s["ratio"] is None for s in searched)
        click.echo(
            f"    output error {gain:.3f}x round-to-nearest's over all sites; "
            f"{kept} sites left unscaled (no scale beat rounding)"
        )


def _size(text: str) -> int:
    """'2GB', '500MB', '1GiB' or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise click.BadParameter(f"{text!r} is not a size such as 2GB or 500MB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B")
    scale = {
        "": 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "KI": 1024,
        "MI": 1024**2,
        "GI": 1024**3,
        "TI": 1024**4,
    }
    return int(number * scale[unit])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmpress")
def main() -> None:
    """Compress Hugging Face causal LMs into compressed-tensors checkpoints."""


@main.command()
@click.argument("model")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output directory."
)
@click.option("--scheme", default=None, help="Preset name; `llmpress schemes` lists them.")
@click.option(
    "--recipe",
    default=None,
    help="An llm-compressor recipe (YAML) instead of --scheme: its quantization modifier "
    "gives the scheme, targets and ignore; GPTQ/AWQ/SmoothQuant modifiers the method.",
)
@click.option(
    "--targets",
    multiple=True,
    help="Modules to quantize: name, class or re:regex. Default: Linear.",
)
@click.option(
    "--ignore", multiple=True, help="Modules to leave alone (wins over targets). Default: lm_head."
)
@click.option(
    "--observer", type=click.Choice(["minmax", "mse"]), default="minmax", show_default=True
)
@click.option(
    "--group-size", type=int, default=None, help="Override the scheme's weight group size."
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--compute-dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default=None,
    help="What calibration computes in. auto: a bf16 checkpoint's bf16 on GPUs and on CPUs "
    "with native bf16 products, float32 on other CPUs.",
)
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option(
    "--packing",
    type=click.Choice(["auto", "dense", "padded"]),
    default="auto",
    show_default=True,
    help="3/5/6/7-bit layout: dense for vLLM and compressed-tensors>=0.18, padded for <=0.17; "
    "auto follows the installed compressed-tensors.",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan and estimates; read and write nothing."
)
@click.option(
    "--dataset",
    default=None,
    help="Calibration text for static-activation schemes (FP8) and --kv-cache: "
    "pydoc-calibration, a .txt/.jsonl/.json/.csv/.parquet file, or a hub dataset owner/name.",
)
@click.option("--num-samples", type=int, default=None, help="Calibration samples (default 128).")
@click.option("--seq-len", type=int, default=None, help="Tokens per sample at most (default 512).")
@click.option("--seed", type=int, default=None, help="Sample selection seed (default 0).")
@click.option(
    "--kv-cache",
    type=click.Choice(["fp8", "fp8-head"]),
    default=None,
    help="Quantize the KV cache to FP8 with scales calibrated on --dataset: fp8 one k/v scale "
    "per layer, fp8-head one per KV head.",
)
@click.option(
    "--method",
    type=_MethodChoice(),
    default=None,
    help="rtn: round to nearest (default); gptq: solve the weights on --dataset's activations; "
    "awq: activation-aware scales, then round to nearest (weight-only schemes); smoothquant, "
    "smoothquant+gptq: migrate activation outliers into the weights first (W8A8, FP8). "
    "Pruning (--sparsity, --mask), alone or with --scheme (then rounded to nearest; "
    "+gptq: GPTQ on the same Hessians, zeros kept): sparsegpt (prunes on --dataset's "
    "Hessians), wanda (by |weight| x input norm), magnitude (by |weight|, no data).",
)
@click.option(
    "--sparsity",
    default=None,
    help="Pruning: the fraction of each weight set to zero (default 0.5), or a comma-separated "
    "list, one per decoder layer. An N:M mask prunes N/M.",
)
@click.option(
    "--mask",
    default=None,
    help="Pruning structure: unstructured (default) or N:M, N zeros in every M consecutive "
    "weights of a row (2:4 for sparse tensor cores).",
)
@click.option(
    "--sparsity-targets",
    multiple=True,
    help="Modules to prune, inside decoder layers (default: --targets).",
)
@click.option(
    "--sparsity-ignore",
    multiple=True,
    help="Modules not to prune (default: --ignore).",
)
@click.option(
    "--smoothing-strength",
    type=float,
    default=None,
    help="SmoothQuant's alpha: how much of the activations' range moves to the weights "
    "(default 0.5).",
)
@click.option(
    "--duo-scaling/--no-duo-scaling",
    default=None,
    help="AWQ: scales from activation and weight magnitudes (default) or activations only.",
)
@click.option(
    "--awq-grid",
    type=int,
    default=None,
    help="AWQ: exponents tried per smoothing site (default 20; the search costs this many "
    "roundings and error evaluations of each layer).",
)
@click.option(
    "--awq-clip",
    is_flag=True,
    default=None,
    help="AWQ: also search each weight group's clipping range on the calibration inputs.",
)
@click.option("--block-size", type=int, default=None, help="GPTQ columns per block (default 128).")
@click.option(
    "--dampening-frac",
    type=float,
    default=None,
    help="GPTQ damping, a fraction of the Hessian's mean diagonal (default 0.01; raised x10 "
    "on a failed factorization).",
)
@click.option(
    "--actorder",
    type=click.Choice(["static", "weight", "group", "dynamic", "none"]),
    default=None,
    help="GPTQ column order: static (default; by activation size, no runtime cost), group "
    "(groups in that order, stored as weight_g_idx), or none.",
)
@click.option(
    "--offload-hessians",
    is_flag=True,
    default=None,
    help="Keep GPTQ's Hessians in host memory (with --device cuda).",
)
@click.option(
    "--propagate",
    type=click.Choice(["compressed", "original", "sequential"]),
    default=None,
    help="What each layer calibrates on: the outputs of the compressed layers before it "
    "(two passes per layer; the default but for AWQ, SparseGPT and Wanda), the original "
    "model's (one pass, about half the time; AWQ's default), or those of the compressed "
    "modules before it, in its own layer too (one pass; SparseGPT's and Wanda's default; not "
    "with smoothing or --kv-cache).",
)
@click.option(
    "--independent",
    is_flag=True,
    default=None,
    help="With several modifiers (AWQ or SmoothQuant, then GPTQ or quantization), calibrate "
    "each on hidden states of its own, as one run per modifier would (default: one pass).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted calibrated run of this command from its last finished layer.",
)
@click.option(
    "--max-memory",
    default=None,
    help="Calibration activations held in memory (e.g. 2GB); the rest spill to disk.",
)
def compress(
    model,
    output,
    scheme,
    recipe,
    targets,
    ignore,
    observer,
    group_size,
    device,
    compute_dtype,
    max_shard_size,
    packing,
    force,
    quiet,
    dry_run,
    dataset,
    num_samples,
    seq_len,
    seed,
    resume,
    max_memory,
    kv_cache,
    method,
    block_size,
    dampening_frac,
    actorder,
    offload_hessians,
    propagate,
    independent,
    smoothing_strength,
    duo_scaling,
    awq_grid,
    awq_clip,
    sparsity,
    mask,
    sparsity_targets,
    sparsity_ignore,
):
    """Compress MODEL (a directory, or a hub id where the network allows) into OUTPUT."""
    from llmpress.lazy_compile import deferred_torch_compile

    with deferred_torch_compile():
        from llmpress.api import compress_options, run
        from llmpress.api import dry_run as plan_only

    options = compress_options(
        scheme,
        recipe,
        targets=targets or None,
        ignore=ignore or None,
        observer=observer,
        group_size=group_size,
        device=device,
        compute_dtype=compute_dtype,
        max_shard_size=_size(max_shard_size),
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
        offload_hessians=offload_hessians or None,
        propagate=propagate,
        independent=independent,
        smoothing_strength=smoothing_strength,
        duo_scaling=duo_scaling,
        awq_clip=awq_clip,
        awq_grid=awq_grid,
        sparsity=_sparsity(sparsity),
        mask=mask,
        sparsity_targets=sparsity_targets or None,
        sparsity_ignore=sparsity_ignore or None,
    )
    cap = None if max_memory is None else _size(max_memory)
    if dry_run:
        _print_plan(plan_only(model, options, cap), output)
        return
    result = run(
        model, output, options, force=force, progress=not quiet, resume=resume, max_memory=cap
    )
    pruned = ""
    if options.prune:
        manifest = json.loads((result.output / "llmpress.json").read_text())
        sparsity = manifest["sparsity"]
        pruned = (
            f"{len(sparsity['modules'])} pruned ({sparsity['structure']}, "
            f"{sparsity['global_sparsity']:.1%} zeros), "
        )
    click.echo(
        f"wrote {result.output} — {result.quantized_modules} layers quantized, {pruned}"
        f"{result.input_bytes / 1e6:.1f} MB -> {result.output_bytes / 1e6:.1f} MB "
        f"({result.ratio:.2f}x) in {result.seconds:.1f} s"
    )


def _sparsity(text: str | None) -> float | list[float] | None:
    """--sparsity: one fraction, or a comma-separated list of them."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: a fraction, or fractions separated by commas"
        ) from None
    return values[0] if len(values) == 1 else values


def _print_plan(plan: dict, output: Path) -> None:
    click.echo(f"plan for {plan['model']} -> {output} (dry run: nothing read or written)")
    click.echo(
        f"  {plan['scheme']} by {plan['algorithm']} ({plan['observer']} observer): "
        f"{plan['quantized_modules']} modules"
    )
    kinds = ", ".join(f"{kind} x {count}" for kind, count in plan["modules_by_kind"].items())
    click.echo(f"    {kinds}")
    if plan.get("pruned_modules"):
        click.echo(f"  pruned: {plan['pruned_modules']} modules inside the decoder layers")
    if plan.get("kv_cache"):
        click.echo(f"  KV cache: {plan['kv_cache']} (k/v scales calibrated on --dataset)")
    if plan["left_alone"]:
        shown = plan["left_alone"][:6]
        more = len(plan["left_alone"]) - len(shown)
        click.echo(f"  left alone: {', '.join(shown)}" + (f" and {more} more" if more else ""))
    calibration = plan["calibration"]
    if calibration:
        click.echo(
            f"  calibration: {calibration['samples']} samples x {calibration['seq_len']} tokens "
            f"at most from {calibration['dataset']} (seed {calibration['seed']}); activations "
            f"{calibration['activation_bytes'] / 1e6:,.0f} MB, "
            f"{calibration['activation_bytes_in_memory'] / 1e6:,.0f} MB of it in memory"
        )
        if calibration["propagate"] == "original":
            click.echo(
                "  one pass per layer: every layer calibrates on the original model's outputs"
            )
        elif calibration["propagate"] == "sequential":
            click.echo(
                "  one pass per layer: every module calibrates on the compressed modules' outputs"
            )
    click.echo(
        f"  read {plan['input_bytes'] / 1e6:,.1f} MB, write about "
        f"{plan['estimated_output_bytes'] / 1e6:,.1f} MB"
    )
    click.echo(
        f"  estimated peak memory {plan['estimated_peak_rss_bytes'] / 1e6:,.0f} MB, time about "
        f"{plan['estimated_seconds']:.0f} s on 2 CPU cores"
    )


@main.command()
def schemes() -> None:
    """List the schemes with one line each."""
    from llmpress.schemes import DESCRIPTIONS

    width = max(map(len, DESCRIPTIONS))
    for name, text in DESCRIPTIONS.items():
        click.echo(f"{name:<{width}}  {text}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(checkpoint: Path, as_json: bool) -> None:
    """Show what a compressed checkpoint holds: groups, formats, bits, size, ratio."""
    from llmpress.checkpoint import summarize

    info = summarize(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        if info.get("sparsity") and info["sparsity"]["pattern_holds"] is False:
            sys.exit(1)
        return
    click.echo(f"{info['checkpoint']}")
    click.echo(
        f"  format {info['format']}, written with compressed-tensors "
        f"{info['compressed_tensors_version']} ({info['packing_layout']} int packing)"
    )
    for name, group in info["groups"].items():
        click.echo(f"  {name}: targets {', '.join(group['targets'])} [{group['format']}]")
        click.echo(f"    weights      {group['weights']}")
        click.echo(f"    activations  {group['input_activations']}")
    if info.get("kv_cache"):
        click.echo(f"  kv cache: {info['kv_cache']}")
    if info["ignore"]:
        click.echo(f"  left in 16 bits: {', '.join(info['ignore'])}")
    click.echo(f"  quantized layers: {info['quantized_layers']}")
    for kind, stored in info["layers_by_kind"].items():
        click.echo(f"    {kind}: {', '.join(f'{n} x {label}' for label, n in stored.items())}")
    if info.get("smoothing"):
        _print_smoothing(info["smoothing"])
    if info.get("gptq"):
        report = info["gptq"]
        # Pruned modules compare with magnitude pruning then round to nearest.
        base = {n: r.get("loss_rtn", r.get("loss_magnitude")) for n, r in report.items()}
        better = sum(r["loss"] < base[n] for n, r in report.items())
        click.echo(
            f"  GPTQ: {len(report)} modules, {better} below round-to-nearest's error "
            "(after magnitude pruning, for pruned modules)"
        )
        for name, r in report.items():
            label = "rtn" if "loss_rtn" in r else "magnitude+rtn"
            click.echo(
                f"    {name}: loss {r['loss']:.4g} ({label} {base[name]:.4g}), "
                f"damping {r['damping']:g}, {r['seconds']:.2f} s"
            )
    click.echo(
        f"  size on disk {info['size_bytes'] / 1e6:.1f} MB; 16-bit equivalent "
        f"{info['bf16_equivalent_bytes'] / 1e6:.1f} MB; ratio {info['compression_ratio']:.2f}x"
    )
    if info.get("sparsity"):
        _print_sparsity(info["sparsity"])


def _print_sparsity(report: dict) -> None:
    """The pruning as stored; exits 1 when an N:M pattern does not hold."""
    click.echo(
        f"  pruned by {report['method']}, {report['structure']}: {report['modules']} modules, "
        f"{report['global_sparsity']:.2%} of their weights zero (per module "
        f"{report['lowest']:.2%} to {report['highest']:.2%})"
    )
    for kind, value in report["by_kind"].items():
        click.echo(f"    {kind}: {value:.2%}")
    if report["pattern_holds"] is not None:
        if report["pattern_holds"]:
            click.echo(f"  {report['structure']} pattern: holds in every pruned weight")
        else:
            broken = report["broken"]
            raise LlmpressError(
                f"the {report['structure']} pattern does not hold in {len(broken)} pruned "
                f"weights (first: {broken[0]})"
            )


@main.command("eval")
@click.argument("checkpoint")
@click.option(
    "--base",
    default=None,
    help="The model CHECKPOINT was compressed from: adds KL, "
    "top-1 agreement and the compression ratio.",
)
@click.option(
    "--dataset",
    default="pydoc",
    show_default=True,
    help="Held-out text: `pydoc` (built in) or a .txt/.jsonl/.json/.csv/.parquet file.",
)
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--windows", type=int, default=16, show_default=True, help="Windows to score.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="auto (the checkpoint's own), bfloat16, float16 or float32.",
)
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA where present), cpu or cuda."
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the figures as JSON to this file (- for stdout).",
)
@click.option("--serve", is_flag=True, help="Also time vLLM serving it (and the base).")
@click.option("--tasks", default=None, help="lm-eval tasks, comma-separated (needs lm-eval).")
@click.option("--task-limit", type=int, default=None, help="At most this many documents per task.")
@click.option(
    "--task-path",
    type=click.Path(path_type=Path),
    default=None,
    help="A folder of extra lm-eval task YAMLs (e.g. tasks on local data).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(
    checkpoint,
    base,
    dataset,
    seq_len,
    windows,
    dtype,
    device,
    json_file,
    serve,
    tasks,
    task_limit,
    task_path,
    quiet,
):
    """Perplexity of CHECKPOINT on held-out text; KL and agreement against --base."""
    from llmpress.evaluate.checkpoint_eval import evaluate_checkpoint, format_report

    report = evaluate_checkpoint(
        checkpoint,
        base=base,
        dataset=dataset,
        seq_len=seq_len,
        windows=windows,
        dtype=dtype,
        device=device,
        progress=not quiet,
        serve=serve,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        task_limit=task_limit,
        task_include_path=task_path,
    )
    figures = json.dumps(report.to_json(), indent=2)
    if json_file is not None and str(json_file) == "-":
        click.echo(figures)
        return
    click.echo(format_report(report))
    if json_file is not None:
        _write_atomically(json_file, figures + "\n")


@main.command()
@click.argument("base")
@click.option(
    "--schemes",
    required=True,
    help="Comma-separated variants: SCHEME or SCHEME:ALGORITHM, e.g. W4A16,FP8_DYNAMIC,W8A8.",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="Report directory."
)
@click.option("--dataset", default="pydoc", show_default=True, help="Held-out text, as for eval.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--windows", type=int, default=16, show_default=True, help="Windows to score.")
@click.option(
    "--group-size", type=int, default=None, help="Weight group size for the int group schemes."
)
@click.option(
    "--calibration-dataset",
    default="pydoc-calibration",
    show_default=True,
    help="Calibration text for the calibrated schemes (FP8, W8A8_STATIC, NVFP4), as for compress.",
)
@click.option(
    "--serve/--no-serve",
    default=None,
    help="Measure vLLM serving speed. Default: where vLLM is installed.",
)
@click.option("--dtype", default="auto", show_default=True, help="Evaluation dtype, as for eval.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option(
    "--discard-checkpoints", is_flag=True, help="Delete the compressed checkpoints at the end."
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def compare(
    base,
    schemes,
    output,
    dataset,
    seq_len,
    windows,
    group_size,
    calibration_dataset,
    serve,
    dtype,
    device,
    discard_checkpoints,
    force,
    quiet,
):
    """Compress BASE with each of --schemes, evaluate each against it, write a report."""
    from llmpress.evaluate.compare import run_compare
    from llmpress.evaluate.report import table_rows

    results = run_compare(
        base,
        schemes,
        output,
        dataset=dataset,
        seq_len=seq_len,
        windows=windows,
        group_size=group_size,
        calibration=calibration_dataset,
        serve=serve,
        dtype=dtype,
        device=device,
        keep_checkpoints=not discard_checkpoints,
        force=force,
        progress=not quiet,
    )
    for row in table_rows(results):
        click.echo("  ".join(cell for cell in row[:6] if cell))
    click.echo(f"report: {output / 'report.md'}")


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.llmpress-partial")
    tmp.write_text(text)
    tmp.replace(path)


def run() -> None:
    """Entry point that turns our errors into one line and exit code 2."""
    try:
        main.main(standalone_mode=False)
    except LlmpressError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    run()
