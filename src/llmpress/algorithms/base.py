"""What every compression algorithm declares, so that the planner, the layer loop, the recipe
reader and the manifest treat them as peers: none of them names an algorithm.

An algorithm has a role, which orders it within a layer (a transform such as smoothing first,
then pruning, then quantization, then the KV cache), the llm-compressor modifier it stands for,
what it needs observed of each module's inputs while calibration batches flow (the runner
composes one observation from the needs of a run's algorithms), the options it owns, and a
`check` that fails before any work with the fix. Its arithmetic lives beside it, in its file,
behind the method of its role that the layer loop calls on the resident layer (`LayerContext`):
a Smoother's `apply`, a Pruner's `masks` and `prune`, a Quantizer's `quantize`.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, create_model

from llmpress.algorithms.layer_smoothing import find_sites, smooth_layer
from llmpress.quantize import check_finite

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

    from llmpress.observation import InputObserver
    from llmpress.plan import Plan
    from llmpress.runner import LayerRunner

# A layer's weights, or their solved states ({"weight", "weight_scale"...}), by module name.
Weights = dict[str, torch.Tensor]
States = dict[str, dict[str, torch.Tensor]]


class Role(enum.IntEnum):
    """Where an algorithm's work falls within a layer; also the order of `a+b` methods."""

    TRANSFORM = 0  # changes the weights, keeps the function (smoothing, rotations)
    PRUNE = 1  # sets weights to zero
    QUANTIZE = 2  # rounds the weights to the scheme's grid
    CACHE = 3  # scales of what attention caches


class Need(enum.Flag):
    """What an algorithm needs observed of each module's inputs over the calibration data."""

    NOTHING = 0
    RANGES = enum.auto()  # running min and max (static activation scales)
    HESSIAN = enum.auto()  # mean(x xᵀ), shared by modules reading one tensor
    CHANNELS = enum.auto()  # per-channel min, max and mean |x| (smoothing)
    INPUT_NORMS = enum.auto()  # per-channel root mean square (Wanda)
    LAYER_IO = enum.auto()  # the layer's inputs and outputs (the KV cache's attention states)


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """One algorithm's declaration; subclasses add the arithmetic of their role."""

    name: str  # as the user writes it: --method NAME, or a part of `a+b`
    role: Role
    modifier: str  # llm-compressor's modifier of the same algorithm
    needs: Need
    summary: str  # one line for --help and the docs
    # Why it needs calibration text, in the words of the error that asks for --dataset;
    # None: it works on the weights alone.
    needs_data: str | None = None
    # What each layer calibrates on, unless --propagate says: "original" (the uncompressed
    # model's outputs), "sequential" (one pass, each module on its compressed predecessors'),
    # or None (no preference: "compressed").
    propagation: str | None = None
    # The manifest section its per-module results go to (None: it writes none).
    manifest: str | None = None
    # Options of CompressOptions it owns (the ones meaningless without it).
    options: tuple[str, ...] = ()

    @property
    def whole_layer(self) -> bool:
        """Whether it needs a whole layer observed before it can act (smoothing, the KV
        cache): then no module can be compressed as soon as its own inputs are seen."""
        return self.role in (Role.TRANSFORM, Role.CACHE)

    def check(
        self, scheme: QuantizationScheme | None, options, label: str = "", method: str = ""
    ) -> None:
        """Fail before any work (LlmpressError naming the fix) where this algorithm cannot
        serve `scheme` (None: a run that only prunes) with these options; `label`: the
        scheme or group in the user's words, `method`: the method the user gave it."""

    def config(self, options=None, **values) -> BaseModel:
        """This algorithm's settings in a run (`options`, a CompressOptions; None: the
        defaults), `values` changed: a frozen model of the options it owns, whose types,
        defaults and constraints are the one table's (llmpress.config), not copies."""
        from llmpress.config import CompressOptions  # the table imports the registry

        given = {n: getattr(options, n) for n in self.options} if options is not None else {}
        return _config_model(self.name, self.options, CompressOptions)(**(given | values))

    def recipe_args(self, options, args: dict | None = None) -> dict:
        """Its llm-compressor modifier's arguments for the run's `options` (`args`: those the
        modifier's kind shares, as targets and config groups), for recipe.yaml."""
        return dict(args or {})

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, kw_only=True)
class Quantizer(Algorithm):
    """Rounds each module's weights to its scheme: by the observer alone, or `solves` them
    on the Hessian of their inputs (the layer loop's shared column solve)."""

    role: Role = Role.QUANTIZE
    solves: bool = False

    def quantize(
        self, ctx: LayerContext, weights: Weights, scheme: QuantizationScheme, masks: Weights
    ) -> States:
        """`weights` (modules of one group of the resident layer) rounded to `scheme`: their
        states. `masks`: where a pruner fixed them (True: pruned), for a quantizer that
        `solves` (the others get the weights already pruned, and no masks)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class Pruner(Algorithm):
    """Chooses the weights set to zero: a mask from the weights (and their inputs' norms)
    before quantization, or, where `solved`, inside the column solve that compensates them."""

    role: Role = Role.PRUNE
    solved: bool = False

    def mask(self, weight, input_norms, sparsity: float, structure):  # noqa: ANN001, ANN201
        """True where `weight` is pruned (`input_norms`: per input channel, where the pruner
        needs them); only for pruners that are not `solved`."""
        raise NotImplementedError(f"{self.name} chooses its mask inside the solve")

    def masks(self, ctx: LayerContext, weights: Weights) -> Weights:
        """The masks of `weights` (pruned modules of the resident layer), chosen before any
        rounding; none for a `solved` pruner, which chooses them as the solve goes."""
        if self.solved:
            return {}
        return self.choose_masks(weights, ctx.plan.sparsity, ctx.watch)

    def choose_masks(self, weights: Weights, sparsity, watch=None) -> Weights:  # noqa: ANN001
        """Each module's `mask` at its target of `sparsity` (a PlannedSparsity), with the
        input norms `watch` observed where this pruner needs them (the data-free loop gives
        none: its pruners need no inputs)."""
        found = {}
        for name, weight in weights.items():
            check_finite(f"{name}.weight", weight)
            norms = watch.channels[name].rms() if self.needs & Need.INPUT_NORMS else None
            found[name] = self.mask(weight, norms, sparsity.modules[name], sparsity.structure)
        return found

    def prune(self, ctx: LayerContext, weights: Weights, masks: Weights) -> States:
        """`weights` pruned, before round-to-nearest or stored dense: by their `masks`."""
        return {n: {"weight": w} for n, w in masked(weights, masks).items()}


@dataclass(frozen=True, kw_only=True)
class Smoother(Algorithm):
    """Scales each smoothing site's channels (a norm or linear and the Linears that read it)
    before the weights are quantized; the function is kept."""

    role: Role = Role.TRANSFORM
    every_mapping: bool = True  # False: only the sites smoothed by a norm (SmoothQuant's)
    # It also rounds the groups it smooths (AWQ): no other quantizer follows it, and under
    # --independent its stage quantizes them.
    quantizes_smoothed: bool = False
    clips: bool = False  # it can search each weight group's clipping range (AWQ)

    def wants(self, mapping) -> bool:  # noqa: ANN001
        return self.every_mapping or mapping.norm

    def choose_scale(self, mapping, balance, stats, hessian, args, observer, dtype, config):  # noqa: ANN001, ANN201
        """The scale of `mapping`'s channels, and what the manifest records of its choice
        (`config`: this smoother's, `self.config(options)`)."""
        raise NotImplementedError

    def prepare(self, ctx: LayerContext, weights: Weights) -> None:
        """Before the resident layer's first pass: its smoothing sites, found on the first
        layer by one real forward (the same in every layer)."""
        find_sites(self, ctx, weights)

    def apply(self, ctx: LayerContext, weights: Weights, others: Weights, groups) -> None:
        """Smooth the resident layer's sites whose readers are in config `groups`: `weights`
        (by module) and `others` (its norms..., by tensor name) take the smoothed values, as
        does the layer, and the statistics observed become those of the smoothed inputs."""
        smooth_layer(self, ctx, weights, others, groups)

    def finish(self, ctx: LayerContext, weights: Weights) -> None:
        """After the scales, before rounding: a smoother's own work on the smoothed `weights`
        (AWQ's clipping search); nothing by default."""


@dataclass
class LayerContext:
    """A run's calibrated layer as the algorithms see it: the plan and options, the resident
    layer (`runner`, `index`), what this stage observed of its inputs (`watch`), where the
    manifest's per-module results go (`report`), and per-run state an algorithm keeps across
    layers (`state`, by algorithm name: smoothing's sites, found on the first layer)."""

    plan: Plan
    options: Any  # llmpress.config.CompressOptions: the one table of the run's options
    runner: LayerRunner
    device: str
    checkpoint_dtype: torch.dtype
    report: dict[str, dict] = field(default_factory=dict)
    index: int = 0
    watch: InputObserver | None = None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """The resident layer's module names start with this."""
        return f"{self.runner.source.layer_prefix}.{self.index}."

    @property
    def observer(self) -> str:
        return self.options.observer

    def config(self, algorithm: Algorithm) -> BaseModel:
        return algorithm.config(self.options)

    def record(self, section: str, name: str, entry: dict) -> None:
        """One module's (or site's) results, in the manifest section `section`."""
        self.report.setdefault(section, {})[name] = entry


def masked(weights: Weights, masks: Weights) -> Weights:
    """`weights` with their masks' weights set to zero (those without a mask as they are)."""
    return {
        n: w.masked_fill(masks[n].to(w.device), 0) if n in masks else w for n, w in weights.items()
    }


@functools.cache
def _config_model(name: str, options: tuple[str, ...], table: type[BaseModel]) -> type[BaseModel]:
    """A frozen pydantic model of `options`, each field as `table` defines it."""
    fields = {n: (table.model_fields[n].annotation, table.model_fields[n]) for n in options}
    title = "".join(part.title() for part in name.replace("-", "_").split("_")) + "Config"
    return create_model(title, __config__=ConfigDict(frozen=True, extra="forbid"), **fields)
