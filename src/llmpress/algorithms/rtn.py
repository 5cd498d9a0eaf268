"""Round to nearest: each weight to the nearest point of its scheme's grid, with scales from the
observer (min-max, or the MSE search) over the weight alone. No data; the arithmetic is
shared with every quantizer's output (llmpress.quantize: observers, packing and the fast path
for int and fp8 weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmpress.algorithms.base import Need, Quantizer
from llmpress.quantize import layer_states


@dataclass(frozen=True, kw_only=True)
class _RoundToNearest(Quantizer):
    def quantize(self, ctx, weights, scheme, masks):  # noqa: ANN001, ANN201
        """Each module by the observer; fused siblings (q/k/v, gate/up) share their global
        scale where the scheme has one."""
        return layer_states(weights, scheme, ctx.plan.fused, ctx.observer, ctx.device)


RTN = _RoundToNearest(
    name="rtn",
    modifier="QuantizationModifier",
    needs=Need.NOTHING,
    summary="round to nearest, scales by the observer (no data unless activations are static)",
    options=("observer",),
)
