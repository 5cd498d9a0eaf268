"""llmpress: post-training compression of Hugging Face causal LMs into compressed-tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["compress", "__version__"]

if TYPE_CHECKING:
    from llmpress.api import compress


def __getattr__(name: str):
    # Importing the package stays cheap (no torch) until the API is used.
    if name == "compress":
        from llmpress.api import compress

        return compress
    raise AttributeError(f"module 'llmpress' has no attribute {name!r}")
