"""The `compare` report: a markdown trade-off table, two PNG plots and results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QUALITY_VS_SIZE = "quality_vs_size.png"
QUALITY_VS_TIME = "quality_vs_time.png"


def _num(value: float | None, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{format(value, spec)}{unit}"


def _serving_cell(serving: dict[str, Any] | None, key: str, spec: str) -> str:
    if serving is None:
        return "not measured"
    if not serving.get("served"):
        return "not served"
    return format(serving[key], spec)


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per model: the base first, then each variant in the order asked."""
    rows = []
    for entry in [results["base"], *results["variants"]]:
        ev, comp, serving = entry.get("eval"), entry.get("compress") or {}, entry.get("serving")
        if ev is None:
            failure = entry.get("error", "failed")
            rows.append([entry["label"], f"failed: {failure}"] + [""] * 10)
            continue
        rows.append(
            [
                entry["label"],
                _num(ev["size_bytes"] / 1e6, ".1f"),
                _num(ev["compression_ratio"], ".2f", "x"),
                _num(ev["perplexity"], ".3f"),
                _num(ev["kl_divergence"], ".4f"),
                _num(ev["top1_agreement"], ".3f"),
                _num(comp.get("seconds"), ".1f"),
                _num(comp.get("peak_rss_bytes") and comp["peak_rss_bytes"] / 1e6, ".0f"),
                _serving_cell(serving, "ttft_ms", ".1f"),
                _serving_cell(serving, "tpot_ms", ".1f"),
                _serving_cell(serving, "throughput_tok_s", ".1f"),
            ]
        )
    return rows


HEADER = [
    "model",
    "size MB",
    "ratio",
    "perplexity",
    "KL nats/tok",
    "top-1 agree",
    "compress s",
    "compress peak MB",
    "vLLM TTFT ms",
    "vLLM TPOT ms",
    "vLLM tok/s",
]


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"# Compression trade-offs: {Path(results['base']['checkpoint']).name}",
        "",
        f"Base model `{results['base']['checkpoint']}`; held-out text `{settings['dataset']}`, "
        f"{settings['windows']} windows x {settings['seq_len']} tokens "
        f"({settings['tokens_scored']} tokens scored per model), evaluated in "
        f"{settings['dtype']} on {settings['device']}. KL is KL(base || model) per token; "
        "top-1 agreement is how often both models rank the same next token first. "
        "Compress time and peak memory are those of the whole `llmpress compress` process.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += [
        "",
        f"![quality vs size]({QUALITY_VS_SIZE})",
        "",
        f"![quality vs time]({QUALITY_VS_TIME})",
    ]
    notes = _notes(results)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    machine = results.get("machine", {})
    if machine:
        lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()]
    return "\n".join(lines) + "\n"


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    serving_settings = results["settings"].get("serving")
    if serving_settings:
        notes.append(
            f"vLLM {serving_settings.get('vllm_version') or ''} on {serving_settings['device']}: "
            f"{serving_settings['prompts']} prompts of about {serving_settings['prompt_tokens']} "
            f"tokens, {serving_settings['output_tokens']} output tokens each. "
            + serving_settings["definition"]
        )
    for entry in [results["base"], *results["variants"]]:
        serving = entry.get("serving")
        if serving and not serving.get("served"):
            notes.append(f"{entry['label']}: vLLM did not serve it here: {serving['reason']}")
        if entry.get("error"):
            notes.append(f"{entry['label']}: {entry['error']}")
    return notes


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """Perplexity against size, and KL against compress time: one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [e for e in [results["base"], *results["variants"]] if e.get("eval")]
    paths = []
    specs = [
        (
            QUALITY_VS_SIZE,
            "size on disk (MB)",
            lambda e: e["eval"]["size_bytes"] / 1e6,
            "perplexity (lower is better)",
            lambda e: e["eval"]["perplexity"],
            done,
        ),
        (
            QUALITY_VS_TIME,
            "compress time (s)",
            lambda e: e["compress"]["seconds"],
            "KL(base || model), nats/token",
            lambda e: e["eval"]["kl_divergence"],
            [e for e in done if e.get("compress")],
        ),
    ]
    for name, xlabel, x_of, ylabel, y_of, entries in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        points = [(x_of(e), y_of(e)) for e in entries]
        for entry, (x, y), offset in zip(entries, points, _label_offsets(points), strict=True):
            is_base = entry is results["base"]
            ax.scatter([x], [y], marker="*" if is_base else "o", s=120 if is_base else 50)
            ax.annotate(entry["label"], (x, y), textcoords="offset points", xytext=offset)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(results['base']['checkpoint']).name}: {ylabel.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = folder / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _label_offsets(points: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Above-right of each point, or below-right when an earlier label sits close by."""
    if not points:
        return []
    xs, ys = zip(*points, strict=True)
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    offsets: list[tuple[int, int]] = []
    for i, (x, y) in enumerate(points):
        crowded = sum(abs(x - px) < 0.25 * dx and abs(y - py) < 0.06 * dy for px, py in points[:i])
        offsets.append((6, 4 - 13 * crowded))
    return offsets


def write_report(results: dict[str, Any], folder: Path) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, folder)
    (folder / "report.md").write_text(markdown(results))
