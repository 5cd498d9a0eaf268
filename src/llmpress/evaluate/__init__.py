"""Evaluation of compressed checkpoints: quality against the base model, size, serving speed.

- `texts`: the held-out text (built-in corpora or files), kept apart from calibration text.
- `windows`: fixed, reproducible token windows over that text.
- `loading`: a checkpoint loaded through transformers + compressed-tensors, in a dtype that
  works for every format.
- `metrics`: perplexity, KL divergence and top-1 agreement against the base, window by window.
- `serving`: TTFT, TPOT and throughput with vLLM serving the checkpoint.
- `lmeval`: optional lm-evaluation-harness tasks.
- `compare`, `report`: many schemes compressed and evaluated side by side, as a report.
"""
