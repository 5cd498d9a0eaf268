"""The plan: which module gets which scheme, checked against the model before any heavy work.

`build_plan` resolves a run's `CompressOptions` (llmpress.config) against the model's module
tree with compressed-tensors' matcher (exact name, class name or `re:` regex; ignore wins).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
)
from compressed_tensors.utils import is_match, match_targets

from llmpress.algorithms import (
    DEFAULT_QUANTIZER,
    parse_method,
    pruner_named,
    smoother_of,
)
from llmpress.algorithms.kvcache import attention_modules, kv_cache_args
from llmpress.config import DEFAULT_TARGETS, CompressOptions
from llmpress.errors import LlmpressError
from llmpress.experts import routers
from llmpress.source import ModelSource
from llmpress.sparsity import Structure, check_columns

# Modules vLLM fuses into one GEMM: they must share NVFP4's global scale.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedGroup:
    """One config group: its scheme and the modules it quantizes."""

    name: str
    scheme: QuantizationScheme
    modules: tuple[str, ...]
    method: str = DEFAULT_QUANTIZER.name


@dataclass(frozen=True)
class PlannedSparsity:
    """The pruning of a run: its method and structure, and each pruned module's target."""

    method: str
    structure: Structure
    modules: dict[str, float]  # module -> the fraction of its weight pruned

    @property
    def pruner(self):  # noqa: ANN201 - llmpress.algorithms.base.Pruner
        return pruner_named(self.method)

    @property
    def needs_data(self) -> bool:
        return self.pruner.needs_data is not None


@dataclass(frozen=True)
class Plan:
    """The resolved plan: the scheme of every quantized module, by config group, the modules
    pruned, and the modules left alone. `modules`: every module whose weight the run changes
    (quantized or pruned), in model order."""

    groups: tuple[PlannedGroup, ...]
    modules: tuple[str, ...]
    ignored: tuple[str, ...]
    fused: dict[str, tuple[str, ...]]
    kv_cache: QuantizationArgs | None = None  # quantization_config.kv_cache_scheme
    sparsity: PlannedSparsity | None = None

    def quantized(self, module: str) -> bool:
        return module in self._by_module

    def pruned(self, module: str) -> bool:
        return self.sparsity is not None and module in self.sparsity.modules

    @property
    def mixed(self) -> bool:
        return len(self.groups) > 1

    @property
    def scheme(self) -> QuantizationScheme:
        """The one scheme of a uniform plan."""
        if self.mixed:
            raise LlmpressError("this step takes one scheme; the plan is mixed precision")
        return self.groups[0].scheme

    def group_of(self, module: str) -> PlannedGroup:
        return self._by_module[module]

    def scheme_of(self, module: str) -> QuantizationScheme:
        return self._by_module[module].scheme

    def method_of(self, module: str) -> str:
        return self._by_module[module].method

    def by_scheme(self, modules) -> list[tuple[QuantizationScheme, list[str]]]:
        """`modules` split by their group's scheme, in group order."""
        return [(g.scheme, members) for g, members in self.by_group(modules)]

    def by_group(self, modules) -> list[tuple[PlannedGroup, list[str]]]:
        """The quantized ones of `modules` split by their group, in group order."""
        split: dict[str, list[str]] = {}
        for name in modules:
            if name in self._by_module:
                split.setdefault(self._by_module[name].name, []).append(name)
        return [(g, split[g.name]) for g in self.groups if g.name in split]

    @cached_property
    def _by_module(self) -> dict[str, PlannedGroup]:
        return {m: g for g in self.groups for m in g.modules}

    @property
    def weight_names(self) -> dict[str, str]:
        return {f"{name}.weight": name for name in self.modules}

    def estimated_output_bytes(self, source: ModelSource) -> int:
        """Input bytes with each quantized weight shrunk to its bits (scales: ~2 % more)."""
        shrink = 0
        for name in self._by_module:
            bits = self.scheme_of(name).weights.num_bits
            numel = source.modules[name].weight.numel()
            shrink += source.nbytes(f"{name}.weight") - int(numel * bits / 8 * 1.02)
        return source.total_bytes - shrink


def build_plan(source: ModelSource, options: CompressOptions) -> Plan:
    """Resolve targets and ignore against the model; fail now on anything that cannot work."""
    linears = {n: m for n, m in source.modules.items() if isinstance(m, torch.nn.Linear)}
    groups: tuple[PlannedGroup, ...] = ()
    chosen: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    if options.quantizes:
        groups, chosen, ignored = _quantized(source, linears, options)
    sparsity = _pruned(source, linears, options) if options.prune else None
    fused = fused_groups(chosen)
    _check_fused_alike(groups, fused)
    for group in groups:
        _check_divisible(group.scheme, group.modules, linears)
        label = (
            options.label
            if not options.groups
            else f"the group of {', '.join(group.scheme.targets)}"
        )
        for algorithm in parse_method(group.method).algorithms:
            algorithm.check(group.scheme, options, label, group.method)
        _check_clipping(group.scheme, group.method, options, label)
    kv_cache = None
    if options.kv_cache is not None:
        kv_cache = kv_cache_args(options.kv_cache)
        if not attention_modules(source.modules[source.layer_prefix or ""]):
            raise LlmpressError(
                f"--kv-cache: {source.path.name} has no attention modules with k/v projections "
                "in its decoder layers to give k/v scales; drop --kv-cache"
            )
    pruned = sparsity.modules if sparsity is not None else {}
    modules = tuple(n for n in linears if n in pruned or n in set(chosen))
    return Plan(groups, modules, ignored, fused, kv_cache, sparsity)


def _quantized(source: ModelSource, linears: dict, options: CompressOptions):
    """The config groups, the quantized modules and the modules left alone."""
    specs = options.scheme_groups
    schemes = [spec.build(options.observer) for spec in specs]
    targets = tuple(dict.fromkeys(t for spec in specs for t in spec.targets))
    _check_targets(source, linears, targets)
    selected = [n for n, m in linears.items() if is_match(n, m, targets)]
    chosen = tuple(n for n in selected if not _matches_any(n, linears[n], options.ignore))
    # Readers apply config_groups to every module a target matches; a regex such as
    # `re:.*mlp.*` also matches the MLP container and its activation, which compressed-tensors
    # cannot quantize. Those are listed in `ignore` so readers build exactly this plan.
    others = tuple(
        n
        for n, m in source.modules.items()
        if n
        and n not in linears
        and is_match(n, m, targets)
        and not _matches_any(n, m, options.ignore)
    )
    # Mixture-of-experts routers stay in 16 bits; readers that take them for Linears (vLLM)
    # must find them ignored.
    ignored = (
        tuple(n for n in selected if n not in chosen) + others + tuple(routers(source.modules))
    )
    if not chosen:
        raise LlmpressError("every targeted layer is ignored; nothing would be quantized")
    _check_weights(source, chosen)
    members = _assign(chosen, linears, specs)
    groups = tuple(
        PlannedGroup(f"group_{i}", scheme, members[i], options.methods[i])
        for i, scheme in enumerate(schemes)
        if members[i]
    )
    if len(groups) < len(specs):
        empty = next(spec for i, spec in enumerate(specs) if not members[i])
        raise LlmpressError(
            f"the group {empty.label} ({', '.join(empty.targets)}) quantizes nothing: more "
            "specific targets of other groups take all its modules"
        )
    return groups, chosen, ignored


def _pruned(source: ModelSource, linears: dict, options: CompressOptions) -> PlannedSparsity:
    """The modules pruned, each with its layer's sparsity: Linears inside decoder layers that
    the sparsity targets match and its ignore does not (as llm-compressor's pruning
    modifiers, which work on the decoder layers' modules); routers are never pruned."""
    targets = options.sparsity_targets
    if targets is None:
        targets = tuple(dict.fromkeys(t for g in options.scheme_groups for t in g.targets))
    targets = targets or DEFAULT_TARGETS
    ignore = options.sparsity_ignore if options.sparsity_ignore is not None else options.ignore
    _check_targets(source, linears, targets)
    skipped = set(routers(source.modules))
    chosen = [
        n
        for n, m in linears.items()
        if is_match(n, m, targets)
        and not _matches_any(n, m, ignore)
        and n not in skipped
        and source.layer_of(f"{n}.weight") is not None
    ]
    if not chosen:
        raise LlmpressError(
            "no Linear layer inside the decoder layers is left to prune by the sparsity "
            "targets and ignore"
        )
    _check_weights(source, chosen)
    structure = options.structure
    for name in chosen:
        check_columns(name, linears[name].in_features, structure)
    modules = {n: options.layer_sparsity(source.layer_of(f"{n}.weight")) for n in chosen}
    if isinstance(options.sparsity, tuple) and len(options.sparsity) != source.num_layers:
        # llm-compressor 0.14 indexes a list by the modules its targets match, in model
        # order (lm_head too): one per decoder layer only when it targets the layers.
        matched = [n for n, m in linears.items() if is_match(n, m, targets)]
        if len(options.sparsity) != len(matched):
            raise LlmpressError(
                f"{len(options.sparsity)} sparsities given: give one per decoder layer "
                f"({source.num_layers}), one per module the sparsity targets match "
                f"({len(matched)}, as llm-compressor reads a list), or one for all"
            )
        modules = {n: options.sparsity[matched.index(n)] for n in chosen}
    return PlannedSparsity(options.prune, structure, modules)


def _check_targets(source: ModelSource, linears: dict, targets: tuple[str, ...]) -> None:
    unmatched = [t for t in targets if not any(_matches(n, m, t) for n, m in linears.items())]
    if unmatched:
        raise LlmpressError(
            f"target {unmatched[0]!r} matches no Linear layer of {source.path.name}; "
            f"example layer names: {', '.join(_examples(linears))}"
        )


def _check_weights(source: ModelSource, chosen) -> None:
    missing = [n for n in chosen if f"{n}.weight" not in source.tensor_files]
    if missing:
        raise LlmpressError(
            f"{len(missing)} targeted layers have no weight in the checkpoint (first: "
            f"{missing[0]}.weight); is the model's naming unusual? --ignore them"
        )


def _assign(chosen, linears, specs) -> list[tuple[str, ...]]:
    """Each module's group, by the most specific target that matches it (compressed-tensors'
    order: exact name, regex, class name). Two groups' regexes on one module are ambiguous
    (the readers break such ties differently) and refused."""
    owner = {t: i for i in reversed(range(len(specs))) for t in specs[i].targets}
    members: list[list[str]] = [[] for _ in specs]
    for name in chosen:
        matched = match_targets(name, linears[name], list(owner))
        regexes = [t for t in matched if t.startswith("re:")]
        if name not in matched and len({owner[t] for t in regexes}) > 1:
            raise LlmpressError(
                f"{name} matches regexes of two groups ({', '.join(regexes)}); "
                "readers resolve such ties differently: make the targets exclusive"
            )
        members[owner[matched[0]]].append(name)
    return [tuple(m) for m in members]


def _check_fused_alike(groups: tuple[PlannedGroup, ...], fused: dict) -> None:
    """vLLM runs q/k/v and gate/up as one GEMM: fused modules need one scheme."""
    of = {m: g for g in groups for m in g.modules}
    for siblings in fused.values():
        schemes = {of[s].name for s in siblings}
        if len(schemes) > 1:
            raise LlmpressError(
                f"{' and '.join(siblings)} are fused into one GEMM by vLLM and need one "
                "scheme; these groups give them different ones: target them together"
            )


def _matches(name: str, module: torch.nn.Module, target: str) -> bool:
    return is_match(name, module, [target])


def _matches_any(name: str, module: torch.nn.Module, patterns: tuple[str, ...]) -> bool:
    return any(is_match(name, module, [p]) for p in patterns)


def _examples(linears: dict[str, torch.nn.Module], count: int = 3) -> list[str]:
    return list(linears)[:count]


def _check_divisible(
    scheme: QuantizationScheme, chosen: tuple[str, ...], linears: dict[str, torch.nn.Module]
) -> None:
    """Group sizes must divide in_features: list the layers that break it and the ways out."""
    args = scheme.weights
    if args.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return
    bad: dict[str, int] = {}
    for name in chosen:
        in_features = linears[name].in_features
        if in_features % args.group_size:
            bad[_generic(name)] = in_features
    if bad:
        layers = ", ".join(f"{n} (in_features {f})" for n, f in sorted(bad.items()))
        fits = sorted({g for g in (16, 32, 64, 128) if all(f % g == 0 for f in bad.values())})
        hint = f"--group-size {fits[-1]}" if fits and args.type == "int" else "another scheme"
        raise LlmpressError(
            f"group size {args.group_size} does not divide in_features of {layers}; "
            f"use {hint}, or --ignore those layers"
        )


def _check_clipping(scheme: QuantizationScheme, method: str, options, label: str) -> None:
    """--awq-clip needs a smoother that clips (AWQ), and its groups' schemes clippable."""
    if not options.awq_clip:
        return
    smoother, run = smoother_of(method), options.smoother
    if run is None or not run.clips or (smoother is run and not smoother.clippable(scheme)):
        raise LlmpressError(
            "--awq-clip searches int weight groups' ranges after AWQ: use it with --method awq "
            f"and an int scheme in groups or channels (W4A16, W8A16...), not {label} "
            f"by {method}"
        )


def _generic(name: str) -> str:
    """`model.layers.3.mlp.down_proj` -> `model.layers.*.mlp.down_proj`, to list layers once."""
    return re.sub(r"\.\d+\.", ".*.", name)


def fused_groups(chosen: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Each module mapped to the siblings it is fused with in vLLM (itself when none)."""
    present = set(chosen)
    groups: dict[str, tuple[str, ...]] = {}
    by_parent: dict[str, list[str]] = defaultdict(list)
    for name in chosen:
        parent, _, leaf = name.rpartition(".")
        by_parent[parent].append(leaf)
    for parent, leaves in by_parent.items():
        for siblings in FUSED_SIBLINGS:
            members = tuple(f"{parent}.{s}" if parent else s for s in siblings if s in leaves)
            if len(members) > 1 and all(m in present for m in members):
                for member in members:
                    groups[member] = members
    for name in chosen:
        groups.setdefault(name, (name,))
    return groups
