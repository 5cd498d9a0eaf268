"""`llmpress verify OUT`: is the checkpoint still what its manifest says it wrote? Every file
the manifest lists is hashed again and compared; each changed, missing or extra file is named.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.provenance.hashes import PROVENANCE_FILES, SIGNATURE, checkpoint_files, sha256_file

# The manifest's layout version; 2 added `inputs` and `outputs` (sha256 and size per file).
SCHEMA_VERSION = 2


@dataclass
class Verification:
    checkpoint: str
    checked: int = 0  # files whose hash matched
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    signed: bool = False
    # "unsigned", "not checked" (signed, no key given), "valid", or why it is not valid
    signature: str = "unsigned"

    @property
    def ok(self) -> bool:
        files_ok = not (self.changed or self.missing or self.extra)
        return files_ok and self.signature in ("unsigned", "not checked", "valid")

    def to_json(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def load_manifest(checkpoint: Path) -> dict:
    path = checkpoint / "llmpress.json"
    if not path.is_file():
        raise LlmpressError(f"{checkpoint} has no llmpress.json: not a checkpoint llmpress wrote")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LlmpressError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version", 1) < SCHEMA_VERSION:
        raise LlmpressError(
            f"{path} records no file hashes (manifest schema {SCHEMA_VERSION} and later do): "
            "it was written by an older llmpress; compress again to verify it"
        )
    return manifest


def verify(
    checkpoint: Path, public_key: Path | None = None, chain: tuple[Path, ...] = ()
) -> Verification:
    """Hash every file the manifest lists and compare; files present but not listed are
    extra. With `public_key` (or a certificate `chain`), the signature must verify too."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise LlmpressError(f"{checkpoint} is not a directory")
    outputs = load_manifest(checkpoint)["outputs"]
    found = {name for name in checkpoint_files(checkpoint) if name not in PROVENANCE_FILES}
    signed = (checkpoint / SIGNATURE).is_file()
    result = Verification(str(checkpoint), signed=signed)
    for name, entry in sorted(outputs.items()):
        path = checkpoint / name
        if not path.is_file():
            result.missing.append(name)
        elif path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            result.changed.append(name)
        else:
            result.checked += 1
    result.extra = sorted(found - set(outputs))
    keyed = public_key is not None or bool(chain)
    if signed:
        result.signature = "not checked"
        if keyed:
            from llmpress.provenance.signing import check_signature

            result.signature = check_signature(checkpoint, public_key, chain) or "valid"
    elif keyed:
        result.signature = f"no {SIGNATURE} to check against the key given"
    return result
