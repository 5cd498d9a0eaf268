"""Readers across compressed-tensors versions: the one vLLM pins (0.17) and the newest (0.20).

Sub-byte packing changed in 0.18 for 3, 5, 6 and 7 bits (padded int32 words became dense), and
neither reader detects the other's layout: 0.20 reads a padded W3A16 checkpoint as garbage
without an error. Policy: we pack with the installed compressed-tensors' own compressor, record
its version in `quantization_config.version`, and our tools refuse a mismatched reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmpress import compress
from llmpress.errors import LlmpressError
from llmpress.inspect import check_reader
from llmpress.schemes import data_free_scheme_names as scheme_names

REPO = Path(__file__).resolve().parents[1]
CT_NEWEST = REPO / ".cache" / "ct-0.20"
ODD_BITS = {"W3A16", "W5A16", "W6A16", "W7A16"}


def _env(ct_path: Path | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    if ct_path is not None:
        if not (ct_path / "compressed_tensors").is_dir():
            pytest.fail(
                f"compressed-tensors 0.20 missing at {ct_path}: run `bash scripts/install.sh`"
            )
        env["PYTHONPATH"] = str(ct_path)
    return env


def read_with(ct_path: Path | None, checkpoints: list[Path], out: Path) -> tuple[dict, dict]:
    """Weights rebuilt by transformers + the chosen compressed-tensors, in a subprocess."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ct_reader.py"), str(out), *map(str, checkpoints)],
        env=_env(ct_path),
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return report, load_file(out)


@pytest.fixture(scope="module")
def both_readers(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    written = [compress(tiny_llama, root / n, n, progress=False).output for n in scheme_names()]
    old = read_with(None, written, root / "ct017.safetensors")
    new = read_with(CT_NEWEST, written, root / "ct020.safetensors")
    return old, new


def test_reader_versions_are_the_ones_we_claim(both_readers):
    (old, _), (new, _) = both_readers
    assert old["version"] == "0.17.0"
    assert new["version"] == "0.20.0"


@pytest.mark.parametrize("name", [n for n in scheme_names() if n not in ODD_BITS])
def test_both_versions_read_the_same_weights(name, both_readers):
    (old, old_w), (new, new_w) = both_readers
    assert name not in old["errors"] and name not in new["errors"]
    keys = [k for k in old_w if k.startswith(f"{name}/")]
    assert len(keys) == 14
    for key in keys:
        assert torch.equal(old_w[key], new_w[key]), key


@pytest.mark.parametrize("name", sorted(ODD_BITS))
def test_odd_bits_written_for_017_are_misread_by_020_and_we_refuse(name, both_readers, tiny_llama):
    (_, old_w), (_, new_w) = both_readers
    original = load_file(tiny_llama / "model.safetensors")
    key = f"{name}/model.layers.0.mlp.down_proj"
    reference = original["model.layers.0.mlp.down_proj.weight"].float()
    good = (old_w[key].float() - reference).norm() / reference.norm()
    bad = (new_w[key].float() - reference).norm() / reference.norm()
    assert good < 0.3 < 0.6 < bad  # 0.20 silently decodes padded words as dense: garbage


def test_check_reader_refuses_mismatched_layout(tiny_llama, tmp_path):
    out = compress(tiny_llama, tmp_path / "w3", "W3A16", progress=False).output
    check_reader(out)  # written by the installed 0.17: fine
    with pytest.raises(
        LlmpressError, match=r"padded layout \(written with compressed-tensors 0\.17\.0\).*<0\.18"
    ):
        check_reader(out, reader_version="0.20.0")
    check_reader(compress(tiny_llama, tmp_path / "w4", "W4A16", progress=False).output, "0.20.0")


def compress_under_020(model: Path, out: Path, scheme: str, *options: str) -> None:
    """Run llmpress itself with compressed-tensors 0.20 importable instead of 0.17."""
    command = ["compress", str(model), "-o", str(out), "--scheme", scheme, "--quiet", *options]
    subprocess.run(
        [sys.executable, "-m", "llmpress.cli", *command],
        env=_env(CT_NEWEST),
        check=True,
        capture_output=True,
    )


def _packed(checkpoint: Path) -> torch.Tensor:
    return load_file(checkpoint / "model.safetensors")["model.layers.0.mlp.down_proj.weight_packed"]


@pytest.mark.parametrize("name", sorted(ODD_BITS))
def test_each_layout_equals_the_compressed_tensors_release_that_defines_it(
    name, tiny_llama, tmp_path
):
    """--packing dense under 0.17 gives 0.20's bytes; --packing padded under 0.20 gives 0.17's."""
    ours_dense = compress(tiny_llama, tmp_path / "d", name, packing="dense", progress=False).output
    ours_padded = compress(
        tiny_llama, tmp_path / "p", name, packing="padded", progress=False
    ).output
    for layout, out in (("auto", tmp_path / "ct20"), ("padded", tmp_path / "ct20-padded")):
        compress_under_020(tiny_llama, out, name, "--packing", layout)
    assert torch.equal(_packed(ours_dense), _packed(tmp_path / "ct20"))
    assert torch.equal(_packed(ours_padded), _packed(tmp_path / "ct20-padded"))
    assert not torch.equal(_packed(ours_dense)[:, :8], _packed(ours_padded)[:, :8])


def test_dense_written_under_017_is_read_by_020(tiny_llama, tmp_path):
    out = compress(tiny_llama, tmp_path / "w3", "W3A16", packing="dense", progress=False).output
    _, weights = read_with(CT_NEWEST, [out], tmp_path / "r.safetensors")
    reference = load_file(tiny_llama / "model.safetensors")[
        "model.layers.0.mlp.down_proj.weight"
    ].float()
    got = weights["w3/model.layers.0.mlp.down_proj"].float()
    assert got.shape == reference.shape
    assert (got - reference).norm() / reference.norm() < 0.3
    with pytest.raises(LlmpressError, match=r"dense layout.*--packing padded"):
        check_reader(out)


def test_written_with_020_reads_with_020_and_is_refused_under_017(tiny_llama, tmp_path):
    """Under compressed-tensors 0.20, llmpress writes the dense layout and records 0.20.0."""
    out = tmp_path / "w3-dense"
    compress_under_020(tiny_llama, out, "W3A16")
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["version"] == "0.20.0"
    report, weights = read_with(CT_NEWEST, [out], tmp_path / "r.safetensors")
    reference = load_file(tiny_llama / "model.safetensors")[
        "model.layers.0.mlp.down_proj.weight"
    ].float()
    got = weights["w3-dense/model.layers.0.mlp.down_proj"].float()
    assert (got - reference).norm() / reference.norm() < 0.3
    with pytest.raises(LlmpressError, match=r"dense layout.*>=0\.18"):
        check_reader(out)
