"""The registry of compression algorithms, and the parser of the `--method` syntax.

Each algorithm is one file of this package that declares itself (llmpress.algorithms.base) and
one line of `ALGORITHMS` below. `--method` names one or several, joined by `+` in role order
(a transform, a pruner, a quantizer): "gptq", "smoothquant+gptq", "sparsegpt+gptq", "wanda".
Nothing outside this package compares an algorithm's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpress.algorithms.awq import AWQ
from llmpress.algorithms.base import Algorithm, Need, Pruner, Quantizer, Role, Smoother
from llmpress.algorithms.gptq import GPTQ
from llmpress.algorithms.kvcache import KV_CACHE
from llmpress.algorithms.magnitude import MAGNITUDE
from llmpress.algorithms.rtn import RTN
from llmpress.algorithms.smoothquant import SMOOTHQUANT
from llmpress.algorithms.sparsegpt import SPARSEGPT
from llmpress.algorithms.wanda import WANDA
from llmpress.errors import LlmpressError

__all__ = ["ALGORITHMS", "Algorithm", "Method", "Need", "Role", "parse_method", "register"]

ALGORITHMS: dict[str, Algorithm] = {
    RTN.name: RTN,
    GPTQ.name: GPTQ,
    AWQ.name: AWQ,
    SMOOTHQUANT.name: SMOOTHQUANT,
    SPARSEGPT.name: SPARSEGPT,
    WANDA.name: WANDA,
    MAGNITUDE.name: MAGNITUDE,
    KV_CACHE.name: KV_CACHE,
}

# The quantizer of a method that names none.
DEFAULT_QUANTIZER = RTN


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm (a plugin's, a test's) to the registry; returns it."""
    if algorithm.name in ALGORITHMS or "+" in algorithm.name:
        raise ValueError(f"an algorithm is already named {algorithm.name!r}, or it has a '+'")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def by_role(role: Role) -> list[Algorithm]:
    return [a for a in ALGORITHMS.values() if a.role == role]


@dataclass(frozen=True)
class Method:
    """A parsed `--method`: at most one algorithm of each role, in role order."""

    smoother: Smoother | None = None
    pruner: Pruner | None = None
    quantizer: Quantizer | None = None  # None: the method names none (round to nearest)

    @property
    def algorithms(self) -> tuple[Algorithm, ...]:
        return tuple(a for a in (self.smoother, self.pruner, self.quantizer) if a is not None)

    @property
    def rounding(self) -> Quantizer:
        """What rounds the weights once smoothed and pruned."""
        return self.quantizer or DEFAULT_QUANTIZER

    @property
    def quantizing(self) -> str | None:
        """The method without its pruner: what CompressOptions.method holds (None: rtn)."""
        parts = [a.name for a in (self.smoother, self.quantizer) if a is not None]
        return "+".join(parts) or None


def parse_method(text: str) -> Method:
    """`text` ("gptq", "smoothquant+gptq", "wanda+gptq"...) as a Method, or a one-line error
    that lists what is known."""
    parts: dict[Role, Algorithm] = {}
    last = None
    for name in str(text).split("+"):
        algorithm = ALGORITHMS.get(name.strip().lower())
        if algorithm is None or algorithm.role == Role.CACHE:
            known = ", ".join(n for n, a in ALGORITHMS.items() if a.role != Role.CACHE)
            raise LlmpressError(f"unknown method {name!r} in {text!r}; known: {known}")
        if last is not None and algorithm.role <= last:
            raise LlmpressError(
                f"--method {text}: join at most one transform, pruner and quantizer, in that "
                "order (e.g. smoothquant+gptq, sparsegpt+gptq)"
            )
        parts[algorithm.role] = algorithm
        last = algorithm.role
    method = Method(parts.get(Role.TRANSFORM), parts.get(Role.PRUNE), parts.get(Role.QUANTIZE))
    if method.smoother and method.smoother.quantizes_smoothed and method.quantizer:
        raise LlmpressError(
            f"--method {text}: {method.smoother.name} rounds the weights it smooths itself; "
            f"give --method {method.smoother.name}, or {method.quantizer.name} in a group of "
            "its own (a recipe)"
        )
    return method


def algorithms_of(methods) -> tuple[Algorithm, ...]:
    """The algorithms these methods (a run's or a stage's) name, each once, in order: "awq" is
    AWQ alone, not the rounding it does itself."""
    found: list[Algorithm] = []
    for method in methods:
        found += parse_method(method).algorithms
    return tuple(dict.fromkeys(found))


def by_modifier(modifier: str, role: Role) -> Algorithm | None:
    """The algorithm of `role` that llm-compressor's `modifier` stands for (the first
    registered: QuantizationModifier is round to nearest), or None."""
    return next((a for a in by_role(role) if a.modifier == modifier), None)


def smoother_of(method: str | None) -> Smoother | None:
    """The smoothing a group's method applies first, or None."""
    return parse_method(method).smoother if method else None


def quantizer_of(method: str | None) -> Quantizer:
    """What rounds a group's weights once smoothed (round to nearest unless named)."""
    return parse_method(method).rounding if method else DEFAULT_QUANTIZER


def pruner_named(name: str | None) -> Pruner | None:
    """The pruner a run's `prune` option names, or None."""
    return parse_method(name).pruner if name else None


def method_choices() -> list[str]:
    """Every `--method` value the CLI offers: each algorithm alone, and a transform or a
    pruner followed by a solving quantizer."""
    singles = [a.name for a in ALGORITHMS.values() if a.role != Role.CACHE]
    solving = [a.name for a in by_role(Role.QUANTIZE) if getattr(a, "solves", False)]
    joined = [
        f"{first.name}+{q}"
        for first in by_role(Role.TRANSFORM) + by_role(Role.PRUNE)
        if not getattr(first, "quantizes_smoothed", False)
        for q in solving
    ]
    return singles + joined
