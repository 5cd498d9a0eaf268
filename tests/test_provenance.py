"""Provenance: the manifest records the size and sha256 of every file a run read and wrote,
`llmpress verify` checks a checkpoint against it and names each changed, missing or extra
file, and the same input, options and seed give the same output hashes."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import load_transformers

from llmpress import compress
from llmpress.errors import LlmpressError
from llmpress.provenance.verify import SCHEMA_VERSION, verify


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from llmpress.cli import run; run()", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _verify_cli(checkpoint, *args) -> subprocess.CompletedProcess:
    return _cli("verify", checkpoint, *args)


def _key_pair(folder, name: str):
    """An elliptic-curve (P-256) key pair as PEM files: (private, public)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                       serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return private, public


@pytest.fixture(scope="module")
def written(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("provenance") / "w4a16"
    compress(tiny_llama, out, "W4A16", progress=False)
    return out


def test_the_manifest_holds_the_hash_of_every_file_read_and_written(written, tiny_llama):
    manifest = json.loads((written / "llmpress.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    environment = manifest["environment"]
    assert environment["device"] == "cpu" and environment["python"].count(".") == 2
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():  # run from a checkout: its commit
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        assert re.fullmatch("[0-9a-f]{40}", head) and environment["llmpress_commit"] == head
    else:
        assert environment["llmpress_commit"] is None
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    assert {"config.json", "model.safetensors"} <= set(inputs)
    for name, entry in inputs.items():
        assert entry == {"bytes": (tiny_llama / name).stat().st_size,
                         "sha256": _sha256(tiny_llama / name)}  # fmt: skip
    on_disk = {p.name for p in written.iterdir() if p.is_file()} - {"llmpress.json"}
    assert set(outputs) == on_disk
    assert {"model.safetensors", "config.json", "recipe.yaml"} <= on_disk
    for name, entry in outputs.items():
        assert entry["sha256"] == _sha256(written / name), name


def test_verify_passes_an_untouched_checkpoint_and_says_it_is_unsigned(written):
    done = _verify_cli(written)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and "unsigned" in done.stdout
    report = json.loads(_verify_cli(written, "--json").stdout)
    assert report["ok"] is True and report["signed"] is False
    assert report["checked"] == len(json.loads((written / "llmpress.json").read_text())["outputs"])


@pytest.mark.parametrize("damage", ["flip", "remove", "add"])
def test_verify_names_each_changed_missing_or_extra_file(written, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(written, copy)
    shard = copy / "model.safetensors"
    if damage == "flip":  # one bit of one weight byte, the size unchanged
        data = bytearray(shard.read_bytes())
        data[-100] ^= 1
        shard.write_bytes(bytes(data))
        kind, name = "changed", "model.safetensors"
    elif damage == "remove":
        (copy / "recipe.yaml").unlink()
        kind, name = "missing", "recipe.yaml"
    else:
        (copy / "notes.txt").write_text("added after the run\n")
        kind, name = "extra", "notes.txt"
    result = verify(copy)
    assert not result.ok and getattr(result, kind) == [name]
    done = _verify_cli(copy)
    assert done.returncode == 1
    assert f"{kind}: {name}" in done.stdout and "FAILED" in done.stdout
    assert json.loads(_verify_cli(copy, "--json").stdout)[kind] == [name]


def test_a_checkpoint_without_hashes_gets_one_clean_error(written, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(written, copy)
    manifest = json.loads((copy / "llmpress.json").read_text())
    del manifest["schema_version"]  # as an earlier llmpress wrote it
    (copy / "llmpress.json").write_text(json.dumps(manifest))
    with pytest.raises(LlmpressError, match="records no file hashes"):
        verify(copy)
    done = _verify_cli(copy)
    assert done.returncode == 2 and done.stderr.startswith("error: ")
    assert "Traceback" not in done.stderr
    (copy / "llmpress.json").unlink()
    assert "no llmpress.json" in _verify_cli(copy).stderr


def test_two_calibrated_runs_give_the_same_output_hashes(tokenized_llama, tmp_path):
    """Reproducible: the same input, options and seed; the manifest's hashes prove it."""
    hashes = []
    for run in ("a", "b"):
        out = tmp_path / run
        compress(tokenized_llama, out, "W4A16", method="gptq", dataset="pydoc-calibration",
                 num_samples=4, seq_len=32, progress=False)  # fmt: skip
        hashes.append(json.loads((out / "llmpress.json").read_text())["outputs"])
    assert hashes[0] == hashes[1]
    assert "model.safetensors" in hashes[0]


@pytest.fixture
def signed(written, tmp_path):
    """A copy of the checkpoint signed by llmpress, and the key pair that signed it."""
    copy = tmp_path / "signed"
    shutil.copytree(written, copy)
    private, public = _key_pair(tmp_path, "signer")
    done = _cli("sign", copy, "--key", private)
    assert done.returncode == 0, done.stderr
    assert (copy / "model.sig").is_file()
    return copy, public


def test_sign_then_verify_with_llmpress_and_with_upstream_model_signing(signed):
    checkpoint, public = signed
    done = _verify_cli(checkpoint, "--key", public)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "signature: valid" in done.stdout
    report = json.loads(_verify_cli(checkpoint, "--key", public, "--json").stdout)
    assert report["ok"] and report["signed"] and report["signature"] == "valid"
    # Without the key: the hashes verify, and the signature is said to be unchecked.
    done = _verify_cli(checkpoint)
    assert done.returncode == 0 and "signature: not checked" in done.stdout
    upstream = subprocess.run(
        [Path(sys.executable).parent / "model_signing", "verify", "key", str(checkpoint),
         "--signature", str(checkpoint / "model.sig"), "--public_key", str(public)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert upstream.returncode == 0, upstream.stdout + upstream.stderr


def test_a_wrong_key_or_a_changed_file_fails_the_signature(signed, tmp_path):
    checkpoint, _ = signed
    _, other = _key_pair(tmp_path, "other")
    done = _verify_cli(checkpoint, "--key", other)
    assert done.returncode == 1 and "signature: " in done.stdout
    assert "signature: valid" not in done.stdout
    (checkpoint / "recipe.yaml").write_text("changed after signing\n")
    result = verify(checkpoint)
    assert result.changed == ["recipe.yaml"] and not result.ok
    # and llmpress refuses to sign a checkpoint that no longer matches its manifest
    private, _ = _key_pair(tmp_path, "again")
    done = _cli("sign", checkpoint, "--key", private)
    assert (
        done.returncode == 2
        and "recipe.yaml" in done.stderr
        and "nothing was signed" in done.stderr
    )


def test_a_signed_checkpoint_still_loads_in_transformers(signed, written):
    checkpoint, _ = signed
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.inference_mode():
        a = load_transformers(checkpoint)(ids).logits
        b = load_transformers(written)(ids).logits
    assert torch.equal(a, b)
