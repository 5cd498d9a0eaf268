"""Smoothing: move a per-channel scale from a layer's activations into its weights.

A mapping pairs a *smooth* side, whose output channels are the *balance* Linears' input
channels, with those Linears: a norm's weight (norm -> q/k/v, norm -> gate/up), or rows of a
Linear when nothing but linear-per-channel operations lie between (v -> o through attention,
up -> down through act(gate) * up). Dividing the smooth side's channel j by s_j and
multiplying the balance columns j by s_j keeps the layer's function exactly; SmoothQuant and
AWQ only differ in how they choose s.

Mappings are inferred from the module graph, once per run, on a real forward of the first
decoder layer: a Linear whose input is the very tensor a norm returned reads that norm
(whatever the family calls it: Gemma3's pre_feedforward_layernorm, Qwen3's, Phi3's fused
qkv_proj all come out right). Linear -> Linear pairs are found by name (v_proj -> o_proj,
up_proj -> down_proj), with a small table for fused projections (Phi3's qkv_proj and
gate_up_proj). Every candidate is then checked by applying random scales and comparing the
layer's outputs: one that does not keep the function is skipped, with the reason, never
applied silently. With grouped-query attention v's channel feeds one o_proj column per query
head of its group: the scale is repeated accordingly (llm-compressor skips v -> o there).
Norms that compute x * (1 + w) (Gemma) are detected by the same probe and smoothed through
their offset.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# Linear -> Linear pairs inside one parent: (smooth, balance, which rows of smooth).
# Rows "all" or, for fused projections, the part that feeds the balance layer.
_LINEAR_PAIRS = (("v_proj", "o_proj"), ("up_proj", "down_proj"))
_FUSED_PAIRS = (("qkv_proj", "o_proj", "v"), ("gate_up_proj", "down_proj", "up"))
# A function check passes when the smoothed layer's outputs match to this relative error:
# float32 reassociation is ~1e-6, 16-bit weights rounded after scaling ~1e-2; a broken
# mapping is off by ~1e-1 or more.
_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
_CHECK_TOLERANCE_16BIT = 5e-2


@dataclass(frozen=True)
class Mapping:
    """One smoothing site, with module names relative to the decoder layer.

    `rows`: the smooth Linear's rows that feed the balance input (a fused projection's part),
    None for a norm or a whole Linear; `index`: for each balance input column, the smooth
    channel that feeds it (None: one to one; grouped-query v -> o repeats channels);
    `offset`: 1 for norms that scale by (1 + w); `passengers`: modules that also read the
    smooth side's output through a weight of their own (a mixture-of-experts router), scaled
    with the balance Linears but neither quantized nor searched."""

    smooth: str
    balance: tuple[str, ...]
    norm: bool
    rows: tuple[int, int] | None = None
    index: torch.Tensor | None = field(default=None, compare=False)
    offset: float = 0.0
    passengers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.smooth} -> {'/'.join(_abridged(self.balance))}"

    def channels(self, balance_columns: int) -> int:
        """How many channels the scale has."""
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        if self.index is not None:
            return int(self.index.max()) + 1
        return balance_columns

    def expand(self, scale: torch.Tensor) -> torch.Tensor:
        """The scale of each balance input column."""
        return scale if self.index is None else scale[self.index.to(scale.device)]

    def reduce(self, column_stat: torch.Tensor) -> torch.Tensor:
        """A per-balance-column statistic, averaged onto the smooth channels."""
        if self.index is None:
            return column_stat
        index = self.index.to(column_stat.device)
        total = torch.zeros(self.channels(0), dtype=column_stat.dtype, device=column_stat.device)
        total.index_add_(0, index, column_stat)
        return total / torch.bincount(index).to(column_stat.dtype)


Tensors = dict[str, torch.Tensor]  # parameter name relative to the layer -> tensor


def apply_scale(mapping: Mapping, scale: torch.Tensor, tensors: Tensors) -> None:
    """Divide the smooth side by `scale`, multiply the balance columns by it, in `tensors`
    (values replaced, not modified in place; computed in float32, stored in each tensor's
    dtype)."""
    scale = scale.to(torch.float32)

    def put(name: str, value: torch.Tensor) -> None:
        tensors[name] = value.to(tensors[name].dtype)

    if mapping.norm:
        key = f"{mapping.smooth}.weight"
        weight = tensors[key].to(torch.float32).to(scale.device)
        put(key, (weight + mapping.offset) / scale - mapping.offset)
        bias = f"{mapping.smooth}.bias"
        if bias in tensors:  # LayerNorm: its shift is scaled with its output
            put(bias, tensors[bias].to(torch.float32).to(scale.device) / scale)
    else:
        start, stop = mapping.rows or (0, len(scale))
        for suffix in ("weight", "bias"):
            key = f"{mapping.smooth}.{suffix}"
            if key not in tensors:
                continue
            value = tensors[key].to(torch.float32).to(scale.device).clone()
            part = value[start:stop]
            value[start:stop] = part / (scale.reshape(-1, 1) if part.ndim == 2 else scale)
            put(key, value)
    columns = mapping.expand(scale)
    for name in (*mapping.balance, *mapping.passengers):
        key = f"{name}.weight"
        put(key, tensors[key].to(torch.float32).to(scale.device) * columns)


def module_tensors(layer: nn.Module, mapping: Mapping) -> Tensors:
    """The layer's parameters a mapping touches, by relative name."""
    names = [mapping.smooth, *mapping.balance, *mapping.passengers]
    out = {}
    for name in names:
        module = layer.get_submodule(name)
        for suffix in ("weight", "bias"):
            value = getattr(module, suffix, None)
            if isinstance(value, torch.Tensor):
                out[f"{name}.{suffix}"] = value.data
    return out


def load_tensors(layer: nn.Module, tensors: Tensors) -> None:
    """Put `tensors` (relative names) into the layer's parameters."""
    for key, value in tensors.items():
        module_name, _, suffix = key.rpartition(".")
        getattr(layer.get_submodule(module_name), suffix).data = value


def is_norm(module: nn.Module) -> bool:
    """A normalization with a per-channel weight (RMSNorm, LayerNorm of any family)."""
    weight = getattr(module, "weight", None)
    return (
        "norm" in type(module).__name__.lower()
        and isinstance(weight, torch.Tensor)
        and weight.ndim == 1
    )


@dataclass
class Inferred:
    """The mappings that keep the layer's function, and why the others were skipped."""

    mappings: list[Mapping]
    skipped: list[str]


def infer_mappings(
    layer: nn.Module,
    balance: set[str],
    run: Callable[[], torch.Tensor],
    head_dim: int | None,
) -> Inferred:
    """Smoothing sites of `layer` whose balance Linears are all in `balance` (relative names
    of the quantized modules). `run`: one forward of the layer on real inputs, returning its
    output; `head_dim`: attention head size, for grouped-query v -> o."""
    modules = dict(layer.named_modules())
    # In module order, so that the sites (and the output bytes) are the same on every run.
    norms = [n for n, m in modules.items() if n and is_norm(m)]
    readers, passengers = _readers_of_norms(layer, modules, norms, run)
    candidates: list[Mapping] = []
    skipped: list[str] = []
    for norm_name, linears in readers.items():
        chosen = tuple(n for n in linears if n in balance)
        if not chosen:
            continue
        if len(chosen) < len(linears):
            left = sorted(set(linears) - set(chosen))
            skipped.append(f"{norm_name}: also read by unquantized {', '.join(left)}")
            continue
        offset = _norm_offset(modules[norm_name])
        riders = tuple(passengers.get(norm_name, ()))
        candidates.append(Mapping(norm_name, chosen, True, offset=offset, passengers=riders))
    candidates += _linear_pairs(modules, balance, head_dim, skipped)
    reference = run().detach().clone()
    kept = []
    for mapping in candidates:
        problem = _check(layer, mapping, run, reference)
        if problem is None:
            kept.append(mapping)
        else:
            skipped.append(f"{mapping.name}: {problem}")
    return Inferred(kept, skipped)


def _readers_of_norms(layer, modules, norms, run) -> tuple[dict, dict]:
    """Which Linears read each norm's output, itself or a view of it (a mixture-of-experts
    block flattens it for its router and experts), seen on one forward; and which other
    modules read it through a 2-D weight of their own (a router: `passengers`)."""
    # The outputs themselves are held for the forward, so no other tensor can take their
    # memory: a view of the same size from the same address is the output, reshaped.
    produced: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    readers: dict[str, list[str]] = {n: [] for n in norms}
    passengers: dict[str, list[str]] = {n: [] for n in norms}
    hooks = []

    def key(tensor: torch.Tensor) -> tuple[int, int]:
        return tensor.data_ptr(), tensor.numel()

    def remember(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                produced[key(output)] = (name, output)

        return hook

    def reader(name, found):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            source, _ = produced.get(key(args[0]), (None, None))
            if source is not None and name not in found[source]:
                found[source].append(name)

        return hook

    for name in norms:
        hooks.append(modules[name].register_forward_hook(remember(name)))
    for name, module in modules.items():
        weight = module._parameters.get("weight")
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(reader(name, readers)))
        elif weight is not None and weight.ndim == 2 and not is_norm(module):
            hooks.append(module.register_forward_pre_hook(reader(name, passengers)))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
        produced.clear()
    return {n: r for n, r in readers.items() if r}, passengers


def _abridged(names: tuple[str, ...]) -> list[str]:
    """Names for messages, a layer's experts folded: mlp.experts.*.gate_proj (x 64)."""
    out: dict[str, list[str]] = {}
    for name in names:
        out.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(name)
    return [f"{g} (x {len(n)})" if len(n) > 1 else n[0] for g, n in out.items()]


def _norm_offset(norm: nn.Module) -> float:
    """1 when the norm scales by (1 + w) (Gemma), 0 when by w: probed with w = 0."""
    weight = norm.weight
    saved = weight.data
    probe = torch.randn(2, weight.shape[0], dtype=weight.dtype, device=weight.device)
    bias = getattr(norm, "bias", None)
    saved_bias = bias.data if isinstance(bias, torch.Tensor) else None
    try:
        weight.data = torch.zeros_like(saved)
        if saved_bias is not None:
            bias.data = torch.zeros_like(saved_bias)
        with torch.inference_mode():
            out = norm(probe)
    finally:
        weight.data = saved
        if saved_bias is not None:
            bias.data = saved_bias
    return 0.0 if bool((out == 0).all()) else 1.0


def _linear_pairs(modules, balance, head_dim, skipped) -> list[Mapping]:
    """v -> o and up -> down, whole or out of a fused projection."""
    out = []
    for name, module in modules.items():
        if not isinstance(module, nn.Linear):
            continue
        parent, _, leaf = name.rpartition(".")
        sibling = _sibling_namer(parent)
        for smooth, target in _LINEAR_PAIRS:
            if leaf == smooth and sibling(target) in modules:
                mapping = _pair(modules, sibling(smooth), sibling(target), None, head_dim)
                _keep(mapping, balance, out, skipped, f"{sibling(smooth)} -> {sibling(target)}")
        for fused, target, part in _FUSED_PAIRS:
            if leaf == fused and sibling(target) in modules:
                rows = _fused_rows(module, modules[sibling(target)], part)
                mapping = _pair(modules, name, sibling(target), rows, head_dim)
                _keep(mapping, balance, out, skipped, f"{name}[{part}] -> {sibling(target)}")
    return out


def _sibling_namer(parent: str) -> Callable[[str], str]:
    return lambda leaf: f"{parent}.{leaf}" if parent else leaf


def _keep(mapping, balance, out, skipped, label) -> None:
    if isinstance(mapping, str):
        skipped.append(f"{label}: {mapping}")
    elif not set(mapping.balance) <= balance:
        skipped.append(f"{label}: {mapping.balance[0]} is not quantized")
    else:
        out.append(mapping)


def _fused_rows(fused: nn.Linear, target: nn.Linear, part: str) -> tuple[int, int]:
    """The rows of a fused projection that feed `target`: up is the second half of gate_up;
    v is the last of qkv's [q: target's width, k: kv, v: kv]."""
    rows = fused.out_features
    if part == "up":
        return rows // 2, rows
    return rows - (rows - target.in_features) // 2, rows


def _pair(modules, smooth, target, rows, head_dim) -> Mapping | str:
    """A Linear -> Linear mapping, with the column index for grouped-query attention."""
    out_rows = rows[1] - rows[0] if rows else modules[smooth].out_features
    columns = modules[target].in_features
    if out_rows == columns:
        return Mapping(smooth, (target,), norm=False, rows=rows)
    if head_dim is None or columns % out_rows or out_rows % head_dim:
        return f"{out_rows} output channels feed {columns} inputs"
    repeat = columns // out_rows
    heads = torch.arange(columns // head_dim) // repeat  # query head -> its kv head
    index = (heads.reshape(-1, 1) * head_dim + torch.arange(head_dim)).reshape(-1)
    return Mapping(smooth, (target,), norm=False, rows=rows, index=index)


def _check(layer, mapping, run, reference) -> str | None:
    """None when random scales on `mapping` keep the layer's output, else what went wrong."""
    tensors = module_tensors(layer, mapping)
    columns = tensors[f"{mapping.balance[0]}.weight"].shape[1]
    device = reference.device
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.randn(mapping.channels(columns), generator=gen) * 0.5).to(device)
    changed = dict(tensors)
    apply_scale(mapping, scale, changed)
    load_tensors(layer, changed)
    try:
        out = run()
    finally:
        load_tensors(layer, tensors)
    error = float((out.float() - reference.float()).norm() / reference.float().norm())
    if error > _CHECK_TOLERANCE.get(reference.dtype, _CHECK_TOLERANCE_16BIT):
        return f"does not keep the layer's function (relative change {error:.2g})"
    return None
