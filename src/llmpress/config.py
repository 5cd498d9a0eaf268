"""The one configuration object of a run: `CompressOptions`, which CLI flags, recipe YAML and
Python keyword arguments all become before anything runs, validated when built; and the
mixed-precision groups it may hold (`SchemeGroup`). Algorithm names are checked against the
registry (llmpress.algorithms); `build_plan` (llmpress.plan) resolves the options against a
model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from compressed_tensors.quantization import (
    QuantizationScheme,
)
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
from llmpress.errors import LlmpressError
from llmpress.packing import installed_layout
from llmpress.schemes import build_scheme
from llmpress.sparsity import Structure

DEFAULT_TARGETS = ("Linear",)


# The output head stays in 16 bits by default, as in llm-compressor's recipes; embeddings are
# never targeted because the default target is the Linear class.
DEFAULT_IGNORE = ("lm_head",)


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


def option(default, help: str, *, cli: dict | None = {}, **constraints):  # noqa: B006, A002
    """A field of CompressOptions: its default, its --help text, and how the CLI takes it
    (`cli`: {} a plain --flag; None: not a flag of its own). `constraints`: pydantic's."""
    return Field(default, description=help, json_schema_extra={"cli": cli}, **constraints)


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

    # Each field is one option of every front end: its default and --help text here, its CLI
    # spelling in `cli` (llmpress.cli builds its flags from this table; "multiple": given
    # several times, "parse": how the text becomes the value, "flag": an on/off switch).
    scheme: str | None = option(None, "Preset name; `llmpress schemes` lists them.", cli=None)
    # Mixed precision: several presets, each over its targets (in place of scheme, targets and
    # group_size). A module several groups target takes the most specific target's group, as
    # compressed-tensors and vLLM decide: an exact name, then a regex, then a class name.
    groups: tuple[SchemeGroup, ...] = option((), "Mixed precision: groups of schemes.", cli=None)
    targets: tuple[str, ...] = option(
        DEFAULT_TARGETS, "Modules to quantize: name, class or re:regex.", cli={"multiple": True}
    )
    ignore: tuple[str, ...] = option(
        DEFAULT_IGNORE, "Modules to leave alone (wins over targets).", cli={"multiple": True}
    )
    observer: Literal["minmax", "mse"] = option("minmax", "Weight scales: min-max, or MSE search.")
    group_size: int | None = option(None, "Override the scheme's weight group size.", gt=0)
    device: str = option("cpu", "cpu or cuda.")
    compute_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto",
        "What calibration computes in. auto: a bf16 checkpoint's bf16 on GPUs and on CPUs "
        "with native bf16 products (AVX512-BF16, AMX), float32 on other CPUs.",
    )
    max_shard_size: int = option(
        2 * 1024**3, "Largest output shard (e.g. 2GB).", cli={"parse": "size"}, gt=0
    )
    packing: Literal["auto", "padded", "dense"] = option(
        "auto",
        "3/5/6/7-bit layout: dense for vLLM and compressed-tensors>=0.18, padded for <=0.17; "
        "auto follows the installed compressed-tensors.",
    )
    dataset: str | None = option(
        None,
        "Calibration text for GPTQ, AWQ, SmoothQuant, SparseGPT, Wanda, static-activation "
        "schemes (FP8) and --kv-cache: pydoc-calibration, a .txt/.jsonl/.json/.csv/.parquet "
        "file, or a hub dataset owner/name.",
    )
    num_samples: int = option(128, "Calibration samples.", gt=0)
    seq_len: int = option(512, "Tokens per sample at most.", gt=0)
    seed: int = option(0, "Sample selection seed.")
    kv_cache: Literal["fp8", "fp8-head"] | None = option(
        None,
        "Quantize the KV cache to FP8 with scales calibrated on --dataset: fp8 one k/v scale "
        "per layer, fp8-head one per KV head (llmpress.algorithms.kvcache).",
    )
    method: Method = option(
        DEFAULT_QUANTIZER.name,
        "rtn: round to nearest; gptq: solve the weights on --dataset's activations; "
        "awq: activation-aware scales, then round to nearest (weight-only schemes); smoothquant, "
        "smoothquant+gptq: migrate activation outliers into the weights first (W8A8, FP8). "
        "Pruning (--sparsity, --mask), alone or with --scheme (then rounded to nearest; "
        "+gptq: GPTQ on the same Hessians, zeros kept): sparsegpt (prunes on --dataset's "
        "Hessians), wanda (by |weight| x input norm), magnitude (by |weight|, no data).",
        cli={"parse": "method"},
    )
    smoothing_strength: float = option(
        0.5,
        "SmoothQuant's alpha: how much of the activations' range moves to the weights.",
        gt=0,
        le=1,
    )
    duo_scaling: bool = option(
        True,
        "AWQ: scales from activation and weight magnitudes, or (--no-duo-scaling) activations "
        "only.",
        cli={"flag": "--duo-scaling/--no-duo-scaling"},
    )
    awq_clip: bool = option(
        False,
        "AWQ: also search each weight group's clipping range on the calibration inputs.",
        cli={"flag": "--awq-clip"},
    )
    awq_grid: int = option(
        20,
        "AWQ: exponents tried per smoothing site (the search costs this many roundings and "
        "error evaluations of each layer).",
        gt=1,
    )
    block_size: int = option(128, "GPTQ columns per block.", gt=0)
    dampening_frac: float = option(
        0.01,
        "GPTQ damping, a fraction of the Hessian's mean diagonal (raised x10 on a failed "
        "factorization).",
        gt=0,
    )
    actorder: Literal["static", "weight", "group", "dynamic", "none"] = option(
        "static",
        "GPTQ column order: static (= weight; by activation size, no runtime cost), group "
        "(= dynamic; groups in that order, stored as weight_g_idx), or none.",
    )
    offload_hessians: bool = option(
        False,
        "Keep GPTQ's Hessians in host memory (with --device cuda).",
        cli={"flag": "--offload-hessians"},
    )
    # None: "original" for AWQ (as AutoAWQ and llm-compressor calibrate it: each layer on the
    # unquantized model's activations), "sequential" for SparseGPT and Wanda, "compressed"
    # otherwise (`propagation`; llmpress.sequential for the one-pass mode).
    propagate: Literal["compressed", "original", "sequential"] | None = option(
        None,
        "What each layer calibrates on: the outputs of the compressed layers before it "
        "(two passes per layer; the default but for AWQ, SparseGPT and Wanda), the original "
        "model's (one pass, about half the time; AWQ's default), or those of the compressed "
        "modules before it, in its own layer too (one pass; SparseGPT's and Wanda's default; not "
        "with smoothing or --kv-cache).",
    )
    independent: bool = option(
        False,
        "With several modifiers (AWQ or SmoothQuant, then GPTQ or quantization), calibrate "
        "each on hidden states of its own, as one run per modifier would (llm-compressor's "
        "independent pipeline; llmpress.stages.Stage).",
        cli={"flag": "--independent"},
    )
    # The pruner; the CLI and `compress` take it as the first part of --method.
    prune: Pruner | None = option(None, "Pruning method.", cli=None)
    sparsity: float | tuple[float, ...] | None = option(
        None,
        "Pruning: the fraction of each weight set to zero (default 0.5), or a comma-separated "
        "list, one per decoder layer. An N:M mask prunes N/M.",
        cli={"parse": "sparsity"},
    )
    mask: str = option(
        "unstructured",
        "Pruning structure: unstructured or N:M, N zeros in every M consecutive weights of a "
        "row (2:4 for sparse tensor cores).",
    )
    sparsity_targets: tuple[str, ...] | None = option(
        None,
        "Modules to prune, inside decoder layers (default: --targets).",
        cli={"multiple": True},
    )
    sparsity_ignore: tuple[str, ...] | None = option(
        None, "Modules not to prune (default: --ignore).", cli={"multiple": True}
    )

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
    def algorithm_configs(self) -> dict[str, BaseModel]:
        """The run's settings nested by algorithm: each algorithm of the run and its frozen
        config (`Algorithm.config`), the view of this table the algorithms read."""
        return {a.name: a.config(self) for a in self.algorithms}

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
