"""The layer loop: every tensor group of the source (a decoder layer, or one loose tensor) read,
compressed and handed to the writer in order, one group in work at a time while the next one
is read. Data-free runs round (and prune) tensor by tensor here; calibrated runs hand each
decoder layer to llmpress.calibrated_layers and journal it for `--resume`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm import tqdm

from llmpress.algorithms.base import masked
from llmpress.config import CompressOptions
from llmpress.journal import Journal
from llmpress.plan import Plan
from llmpress.quantize import check_finite, compress_layer
from llmpress.source import ModelSource
from llmpress.writer import CheckpointWriter

# Unquantized tensors larger than this (embeddings, the output head) are copied through in
# pieces instead of being held whole: they are the largest tensors of most models.
STREAM_BYTES = 1 << 26


def is_streamed(source: ModelSource, plan: Plan, group: list[str]) -> bool:
    """A loose unquantized tensor too large to hold whole: copied through in pieces."""
    return (
        len(group) == 1
        and group[0] not in plan.weight_names
        and source.nbytes(group[0]) > STREAM_BYTES
    )


def write_tensors(
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
    streamed = [is_streamed(source, plan, g) for g in groups]
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
                    packed = calibrated.compress(layer, to_quantize, tensors, options.layout)
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

    pruner = plan.sparsity.pruner  # a data-free one: it needs no inputs
    chosen = {n: w for n, w in weights.items() if plan.pruned(n)}
    weights.update(masked(chosen, pruner.choose_masks(chosen, plan.sparsity)))
    stored = {}
    for name in chosen:
        pruned[name] = round(zero_fraction(weights[name]), 6)  # served zeros may add some
        if not plan.quantized(name):
            stored[name] = {"weight": weights[name]}
    return stored


def _record_served_zeros(packed: dict, plan: Plan, options: CompressOptions, pruned: dict):
    """Each quantized pruned module's zeros as readers reconstruct its weight (rounding may
    add some to the pruned ones), where the installed compressed-tensors reads the layout."""
    from llmpress.packing import installed_layout
    from llmpress.served import served_zeros

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
