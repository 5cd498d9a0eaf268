"""Round to nearest: each weight to the nearest point of its scheme's grid, with scales from the
observer (min-max, or the MSE search) over the weight alone. No data; the arithmetic is
shared with every quantizer's output (llmpress.quantize: observers, packing and the fast path
for int and fp8 weights).
"""

from __future__ import annotations

from llmpress.algorithms.base import Need, Quantizer

RTN = Quantizer(
    name="rtn",
    modifier="QuantizationModifier",
    needs=Need.NOTHING,
    summary="round to nearest, scales by the observer (no data unless activations are static)",
    options=("observer",),
)
