"""`llmpress` command line: compress, schemes, inspect. Flags become `CompressOptions`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llmpress.cli_options import TableCommand, _size, _table_values
from llmpress.errors import LlmpressError


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llmpress")
def main() -> None:
    """Compress Hugging Face causal LMs into compressed-tensors checkpoints."""


@main.command(cls=TableCommand)
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
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--dry-run", is_flag=True, help="Print the plan and estimates; read and write nothing."
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
def compress(model, output, scheme, recipe, force, quiet, dry_run, resume, max_memory, **table):
    """Compress MODEL (a directory, or a hub id where the network allows) into OUTPUT."""
    from llmpress.lazy_compile import deferred_torch_compile

    with deferred_torch_compile():
        from llmpress.api import compress_options, run
        from llmpress.estimate import dry_run as plan_only

    options = compress_options(scheme, recipe, **_table_values(table))
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
    from llmpress.inspect import summarize

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


_KEY = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--key", type=_KEY, help="The signer's public key (PEM): check the signature.")
@click.option("--chain", type=_KEY, multiple=True, help="Certificates to check a signature by.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for CI pipelines).")
def verify(checkpoint: Path, key: Path | None, chain: tuple[Path, ...], as_json: bool) -> None:
    """Check every file of CHECKPOINT against the hashes its llmpress.json recorded, and its
    signature with --key: each changed, missing or extra file is named, exit status 1."""
    from llmpress.provenance.verify import verify as check

    result = check(checkpoint, key, chain)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        for kind in ("changed", "missing", "extra"):
            for name in getattr(result, kind):
                click.echo(f"{kind}: {name}")
        verdict = "verified" if result.ok else "FAILED"
        click.echo(f"{verdict}: {result.checked} files match the manifest")
        hint = " (give --key to check it)" if result.signature == "not checked" else ""
        click.echo(f"signature: {result.signature}{hint}")
    if not result.ok:
        sys.exit(1)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", type=_KEY, help="Private key (PEM, elliptic curve) to sign with.")
@click.option("--certificate", type=_KEY, help="The key's certificate (certificate signing).")
@click.option("--chain", type=_KEY, multiple=True, help="Certificates from it up to a root.")
@click.option("--password", default=None, help="The private key's password, if it has one.")
@click.option("--sigstore", is_flag=True, help="Keyless signing through Sigstore (network).")
def sign(checkpoint: Path, key, certificate, chain, password, sigstore: bool) -> None:
    """Sign CHECKPOINT (once its files match its manifest): model.sig beside it, in the
    OpenSSF model-signing format that `model_signing verify` reads."""
    from llmpress.provenance.signing import sign as make

    target = make(
        checkpoint, key, certificate=certificate, chain=chain, password=password, sigstore=sigstore
    )
    click.echo(f"signed {checkpoint}: {target.name}")


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
