"""The plan: which module gets which scheme, checked against the model before any heavy work.

`CompressOptions` is the one configuration object: CLI flags and Python arguments become it
before anything runs. `build_plan` resolves it against the model's module tree with
compressed-tensors' matcher (exact name, class name or `re:` regex; ignore wins).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Literal

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStrategy,
)
from compressed_tensors.utils import is_match, match_targets
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llmpress.algorithms import (
    DEFAULT_QUANTIZER,
    Algorithm,
    Quantizer,
    Smoother,
    algorithms_of,
    parse_method,
    pruner_named,
    quantizer_of,
    smoother_of,
)
from llmpress.algorithms.kvcache import attention_modules, kv_cache_args
from llmpress.errors import LlmpressError
from llmpress.experts import routers
from llmpress.packing import installed_layout
from llmpress.schemes import build_scheme
from llmpress.source import ModelSource
from llmpress.sparsity import Structure, check_columns

DEFAULT_TARGETS = ("Linear",)
# The output head stays in 16 bits by default, as in llm-compressor's recipes; embeddings are
# never targeted because the default target is the Linear class.
DEFAULT_IGNORE = ("lm_head",)

# Modules vLLM fuses into one GEMM: they must share NVFP4's global scale.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))

log = logging.getLogger(__name__)


def _quantizing_method(value: str) -> str:
    """A group's or run's method: a transform and/or a quantizer (the pruner is `prune`)."""
    try:
        method = parse_method(value)
    except LlmpressError as error:
        raise ValueError(str(error)) from None
    if method.pruner is not None:
        raise ValueError(f"{value}: {method.pruner.name} prunes; give it as `prune`")
    return value


def _pruning_method(value: str) -> str:
    try:
        method = parse_method(value)
    except LlmpressError as error:
        raise ValueError(str(error)) from None
    if method.algorithms != (method.pruner,):
        raise ValueError(f"{value} is not a pruning method")
    return value


# Algorithm names as the user writes them, checked against the registry (llmpress.algorithms).
Method = Annotated[str, AfterValidator(_quantizing_method)]
Pruner = Annotated[str, AfterValidator(_pruning_method)]


class SchemeGroup(BaseModel):
    """One group of a run: a preset (and group size), or compressed-tensors' scheme arguments
    spelled out (`args`: weights, input_activations, output_activations, format), over its
    own targets; written as one config group of the checkpoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str | None = None
    args: dict | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    group_size: int | None = Field(default=None, gt=0)
    # This group's method, where a run mixes algorithms (None: the run's `method`).
    method: Method | None = None

    @field_validator("args")
    @classmethod
    def _canonical(cls, args: dict | None) -> dict | None:
        """The arguments as compressed-tensors reads them, without the defaults and the
        options a run sets (the weight observer, GPTQ's actorder): equal schemes, equal args."""
        if args is None:
            return None
        try:
            scheme = QuantizationScheme.model_validate({**args, "targets": ["Linear"]})
        except (ValidationError, NotImplementedError) as exc:
            raise ValueError(f"invalid scheme arguments: {exc}") from None
        if scheme.weights is None:
            raise ValueError("a scheme needs weights")
        canonical = {}
        for field in ("weights", "input_activations", "output_activations"):
            value = getattr(scheme, field)
            if value is not None:
                drop = {"observer", "observer_kwargs", "actorder"} if field == "weights" else set()
                canonical[field] = value.model_dump(
                    mode="json", exclude_defaults=True, exclude=drop
                )
        if scheme.format is not None:
            canonical["format"] = str(scheme.format)
        return canonical

    @model_validator(mode="after")
    def _preset_or_args(self) -> SchemeGroup:
        if (self.scheme is None) == (self.args is None):
            raise ValueError("a group takes a preset scheme or spelled-out args, one of the two")
        if self.args is not None and self.group_size is not None:
            raise ValueError("spelled-out args give their own group_size")
        return self

    @property
    def label(self) -> str:
        if self.scheme is not None:
            return self.scheme
        weights = self.args.get("weights") or {}
        return f"custom {weights.get('type', 'int')}{weights.get('num_bits', 8)}"

    def build(self, observer: str) -> QuantizationScheme:
        if self.scheme is not None:
            scheme = build_scheme(self.scheme, list(self.targets), self.group_size)
        else:
            try:
                scheme = QuantizationScheme.model_validate(
                    {**self.args, "targets": list(self.targets)}
                )
            except (ValidationError, NotImplementedError) as exc:
                raise LlmpressError(f"a custom scheme's arguments are invalid: {exc}") from None
        scheme.weights.observer = observer
        return scheme


class CompressOptions(BaseModel):
    """Everything a compression run needs to know, validated when built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str | None = None
    # Mixed precision: several presets, each over its targets (in place of scheme, targets and
    # group_size). A module several groups target takes the most specific target's group, as
    # compressed-tensors and vLLM decide: an exact name, then a regex, then a class name.
    groups: tuple[SchemeGroup, ...] = ()
    targets: tuple[str, ...] = DEFAULT_TARGETS
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    observer: Literal["minmax", "mse"] = "minmax"
    group_size: int | None = Field(default=None, gt=0)
    device: str = "cpu"
    # What calibration computes in: "auto" is the checkpoint's bfloat16 on GPUs and on CPUs
    # with native bf16 products (AVX512-BF16, AMX), float32 on other CPUs (and for float16 or
    # float32 checkpoints on any CPU).
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_shard_size: int = Field(default=2 * 1024**3, gt=0)
    # Sub-byte layout for 3/5/6/7-bit weights: "auto" is what the installed compressed-tensors
    # reads; "dense" is what vLLM and compressed-tensors >= 0.18 read; "padded" is <= 0.17's.
    packing: Literal["auto", "padded", "dense"] = "auto"
    # Calibration text, for schemes with static activation scales (see llmpress.data).
    dataset: str | None = None
    num_samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=512, gt=0)
    seed: int = 0
    # FP8 KV cache: "fp8" one k/v scale per attention, "fp8-head" one per KV head (see
    # llmpress.algorithms.kvcache); calibrated on `dataset`.
    kv_cache: Literal["fp8", "fp8-head"] | None = None
    # How weights are rounded: "rtn" (round to nearest, by the observer) or "gptq" (error
    # feedback through the inputs' Hessian, llmpress.algorithms.gptq; needs `dataset`), after optional
    # smoothing: "awq" (weight-only schemes, then round to nearest), "smoothquant" (schemes
    # that quantize activations), "smoothquant+gptq" (the standard W8A8 recipe).
    method: Method = DEFAULT_QUANTIZER.name
    smoothing_strength: float = Field(default=0.5, gt=0, le=1)  # SmoothQuant's α
    duo_scaling: bool = True  # AWQ: scales from activations and weights (False: activations)
    awq_clip: bool = False  # AWQ: also search each weight group's clipping range
    awq_grid: int = Field(default=20, gt=1)  # AWQ: exponents tried per smoothing site
    block_size: int = Field(default=128, gt=0)
    dampening_frac: float = Field(default=0.01, gt=0)
    # GPTQ's column order: "static" (= "weight", llm-compressor's default), "group"
    # (= "dynamic": groups in activation order, `weight_g_idx` stored), or "none" (in order).
    actorder: Literal["static", "weight", "group", "dynamic", "none"] = "static"
    offload_hessians: bool = False
    # What the next layer calibrates on: "compressed" (each layer is run again compressed, so
    # the next one sees what it will see when served; two passes per layer, as llm-compressor's
    # sequential pipeline) or "original" (the uncompressed layer's outputs, from the observing
    # pass itself: one pass per layer, about half the time, statistics of the original model).
    # "sequential": one pass per layer in which each module calibrates on the outputs of the
    # compressed modules before it, in its layer too (llmpress.sequential); the paused batches
    # hold their activations meanwhile. Not with smoothing or --kv-cache.
    # None: "original" for AWQ (as AutoAWQ and llm-compressor calibrate it: each layer on the
    # unquantized model's activations), "sequential" for SparseGPT and Wanda, "compressed"
    # otherwise (`propagation`).
    propagate: Literal["compressed", "original", "sequential"] | None = None
    # Several modifiers (AWQ or SmoothQuant, then the quantization modifier): each calibrated
    # on its own hidden states, as one run per modifier would be, instead of all of them on
    # one sequential pass (llm-compressor's "independent" pipeline; llmpress.calibrate.Stage).
    independent: bool = False
    # Pruning (llmpress.sparsity), alone or before the scheme's quantization in the same run:
    # SparseGPT (its column solve also quantizes, on the same Hessians), Wanda or magnitude.
    prune: Pruner | None = None
    # The fraction of each pruned weight set to zero (default 0.5), or one per decoder layer;
    # an N:M mask prunes N/M.
    sparsity: float | tuple[float, ...] | None = None
    mask: str = "unstructured"  # or "N:M": N zeros in every M consecutive weights of a row
    # The modules pruned (inside decoder layers): None, the quantized ones' targets/ignore.
    sparsity_targets: tuple[str, ...] | None = None
    sparsity_ignore: tuple[str, ...] | None = None

    @model_validator(mode="after")
    def _one_scheme_source(self) -> CompressOptions:
        if (self.scheme is None) == (not self.groups) and not (
            self.prune and self.scheme is None and not self.groups
        ):
            raise ValueError("give a scheme, or groups of schemes for mixed precision")
        if self.groups and (self.targets != DEFAULT_TARGETS or self.group_size is not None):
            raise ValueError("with groups, each group gives its targets and group size")
        return self

    @model_validator(mode="after")
    def _pruning(self) -> CompressOptions:
        pruning = (self.sparsity, self.sparsity_targets, self.sparsity_ignore)
        if self.prune is None:
            if any(v is not None for v in pruning) or self.mask != "unstructured":
                raise ValueError(
                    "sparsity, mask and sparsity targets need a pruning method (sparsegpt, "
                    "wanda or magnitude)"
                )
            return self
        structure = Structure.parse(self.mask)
        values = self.sparsity if isinstance(self.sparsity, tuple) else (self.sparsity,)
        for value in values:
            if value is not None and not 0 < value < 1:
                raise ValueError(f"sparsity {value} is not a fraction between 0 and 1")
        if (
            structure.structured
            and self.sparsity is not None
            and any(abs(v - structure.sparsity) > 1e-9 for v in values)
        ):
            raise ValueError(
                f"a {structure.label} mask prunes exactly {structure.sparsity:g} of each "
                "weight; drop sparsity, or use an unstructured mask"
            )
        solved = self.pruner.solved
        if structure.structured and solved and self.block_size % structure.m:
            raise ValueError(f"block_size must be a multiple of the mask's M ({structure.m})")
        if self._smoothers or self.independent:
            raise ValueError(
                "pruning runs with round to nearest or GPTQ quantization; AWQ, SmoothQuant and "
                "--independent are not combined with it"
            )
        return self

    @property
    def structure(self) -> Structure:
        return Structure.parse(self.mask)

    def layer_sparsity(self, layer: int) -> float:
        """The fraction pruned in decoder layer `layer`."""
        if self.structure.structured:
            return self.structure.sparsity
        if isinstance(self.sparsity, tuple):
            return self.sparsity[layer]
        return 0.5 if self.sparsity is None else self.sparsity

    @property
    def quantizes(self) -> bool:
        return self.scheme is not None or bool(self.groups)

    @property
    def scheme_groups(self) -> tuple[SchemeGroup, ...]:
        """The run's groups: `groups`, or the one group that scheme, targets and group_size
        make (none when the run only prunes)."""
        if self.groups:
            return self.groups
        if self.scheme is None:
            return ()
        return (SchemeGroup(scheme=self.scheme, targets=self.targets, group_size=self.group_size),)

    @property
    def label(self) -> str:
        """The scheme, or the mixed-precision groups, in words (with the pruning first)."""
        quantized = self._quantized_label
        if self.prune is None:
            return quantized
        pruned = f"{self.structure.label} sparse ({self.prune})"
        return f"{pruned} + {quantized}" if quantized else pruned

    @property
    def _quantized_label(self) -> str | None:
        if not self.groups:
            return self.scheme
        if len(self.groups) == 1:
            return self.groups[0].label
        return " + ".join(f"{g.label} ({', '.join(g.targets)})" for g in self.groups)

    @property
    def propagation(self) -> str:
        """What each layer calibrates on: `propagate`, or by default "original" where every
        group is AWQ's, "sequential" for SparseGPT and Wanda, "compressed" otherwise."""
        return self.propagate or default_propagation(self.algorithms, self.kv_cache is not None)

    @property
    def methods(self) -> tuple[str, ...]:
        """Each group's method, in group order."""
        return tuple(g.method or self.method for g in self.scheme_groups)

    @property
    def algorithms(self) -> tuple[Algorithm, ...]:
        """Every algorithm of the run, once each: the pruner, then each group's in order."""
        return algorithms_of(([self.prune] if self.prune else []) + list(self.methods))

    @property
    def method_names(self) -> list[str]:
        """The algorithms in the user's words: the pruner, then each distinct group method."""
        return ([self.prune] if self.prune else []) + list(dict.fromkeys(self.methods))

    @property
    def pruner(self):  # noqa: ANN201 - llmpress.algorithms.base.Pruner | None
        return pruner_named(self.prune)

    @property
    def solver(self) -> Quantizer | None:
        """The solving quantizer (GPTQ) of some group, or None where all round to nearest."""
        return next((q for m in self.methods if (q := quantizer_of(m)).solves), None)

    @property
    def smoother(self) -> Smoother | None:
        """The smoothing applied before rounding, or None (one kind per run)."""
        return next(iter(self._smoothers), None)

    @property
    def _smoothers(self) -> dict[Smoother, None]:
        return dict.fromkeys(s for m in self.methods if (s := smoother_of(m)) is not None)

    @model_validator(mode="after")
    def _one_smoother(self) -> CompressOptions:
        if len(self._smoothers) > 1:
            raise ValueError("one kind of smoothing per run: AWQ or SmoothQuant, not both")
        return self

    @property
    def layout(self) -> str:
        return installed_layout() if self.packing == "auto" else self.packing

    @field_validator("targets")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("targets must name at least one module pattern")
        return value


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
    def needs_data(self) -> bool:
        return pruner_named(self.method).needs_data is not None


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


def default_propagation(algorithms, kv_cache: bool = False) -> str:
    """What layers calibrate on when `--propagate` is not given, for a run of these
    algorithms: the original model's outputs where every one of them prefers it (AWQ alone,
    as AutoAWQ and llm-compressor run it); the compressed modules' outputs in one pass
    ("sequential") where one prefers it (SparseGPT, Wanda) and nothing needs the whole layer
    observed first (smoothing, the KV cache); the compressed layers' otherwise."""
    algorithms = set(algorithms)
    if algorithms and all(a.propagation == "original" for a in algorithms):
        return "original"
    if any(a.propagation == "sequential" for a in algorithms) and sequential_allowed(
        algorithms, kv_cache
    ):
        return "sequential"
    return "compressed"


def sequential_allowed(algorithms, kv_cache: bool) -> bool:
    """Whether a run can compress each module as soon as its inputs are observed: smoothing
    needs the statistics of a whole layer first, and the KV cache those of its attention."""
    return not kv_cache and not any(a.whole_layer for a in algorithms)


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
