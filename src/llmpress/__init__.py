"""llmpress: post-training compression of Hugging Face causal LMs into compressed-tensors."""

__version__ = "0.1.0"
