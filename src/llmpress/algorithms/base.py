"""What every compression algorithm declares, so that the planner, the layer loop, the recipe
reader and the manifest treat them as peers: none of them names an algorithm.

An algorithm has a role, which orders it within a layer (a transform such as smoothing first,
then pruning, then quantization, then the KV cache), the llm-compressor modifier it stands for,
what it needs observed of each module's inputs while calibration batches flow (the runner
composes one observation from the needs of a run's algorithms), the options it owns, and a
`check` that fails before any work with the fix. Its arithmetic lives beside it, in its file:
`apply`-style methods that the layer loop calls on the resident layer, by role.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, create_model

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme


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

    def config(self, options) -> BaseModel:
        """This algorithm's settings in a run: a frozen model of the options it owns, whose
        types, defaults and constraints are the one table's (llmpress.config), not copies."""
        return _config_model(self.name, self.options, type(options))(
            **{name: getattr(options, name) for name in self.options}
        )

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

    def choose_scale(self, mapping, balance, stats, hessian, args, observer, dtype, options):  # noqa: ANN001, ANN201
        """The scale of `mapping`'s channels, and what the manifest records of its choice."""
        raise NotImplementedError


@functools.cache
def _config_model(name: str, options: tuple[str, ...], table: type[BaseModel]) -> type[BaseModel]:
    """A frozen pydantic model of `options`, each field as `table` defines it."""
    fields = {n: (table.model_fields[n].annotation, table.model_fields[n]) for n in options}
    title = "".join(part.title() for part in name.replace("-", "_").split("_")) + "Config"
    return create_model(title, __config__=ConfigDict(frozen=True, extra="forbid"), **fields)
