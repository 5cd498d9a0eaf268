"""`llmpress sign` and the signature half of `llmpress verify`, through the OpenSSF
`model-signing` library: its standard signature file, `model.sig`, beside the model, so that
the upstream `model_signing verify` command accepts it unchanged.

The signature covers every file of the checkpoint, `llmpress.json` included, whose hashes
cover every file in turn; a checkpoint is signed only once its files match its manifest.
Keys are elliptic-curve PEM files (`--key`), with `--certificate` (and `--chain`) for
certificate-based signing; `--sigstore` signs keyless through Sigstore's public services,
where the network allows (an OIDC identity in a browser, or ambient credentials in CI).
"""

from __future__ import annotations

from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.provenance.hashes import SIGNATURE


def _hashing():  # noqa: ANN202 - model_signing.hashing.Config
    from model_signing import hashing

    # The signature is not part of what it signs (recorded in it, so verifiers skip it too).
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE])


def sign(
    checkpoint: Path,
    key: Path | None = None,
    *,
    certificate: Path | None = None,
    chain: tuple[Path, ...] = (),
    password: str | None = None,
    sigstore: bool = False,
) -> Path:
    """Sign `checkpoint` (after checking its files against its manifest); returns the
    signature's path. `key`: the private key (PEM); `certificate`: its certificate, `chain`
    the certificates up to a root; `sigstore`: keyless, instead of a key."""
    from model_signing import signing

    from llmpress.provenance.verify import verify

    checked = verify(checkpoint)
    if not checked.ok:
        names = checked.changed + checked.missing + checked.extra
        raise LlmpressError(
            f"{checkpoint} does not match its manifest ({', '.join(names)}): "
            "run `llmpress verify` to see what changed; nothing was signed"
        )
    if sigstore == (key is not None):
        raise LlmpressError("sign with --key PRIVATE.pem or with --sigstore (one of the two)")
    config = signing.Config().set_hashing_config(_hashing())
    try:
        if sigstore:
            config.use_sigstore_signer()
        elif certificate is not None:
            config.use_certificate_signer(
                private_key=key, signing_certificate=certificate, certificate_chain=chain
            )
        else:
            config.use_elliptic_key_signer(private_key=key, password=password)
        target = checkpoint / SIGNATURE
        config.sign(checkpoint, target)
    except (ValueError, TypeError, OSError) as error:  # a bad key, password or certificate
        raise LlmpressError(f"cannot sign {checkpoint}: {error}") from None
    return target


def check_signature(
    checkpoint: Path, public_key: Path | None = None, chain: tuple[Path, ...] = ()
) -> str | None:
    """Why the signature of `checkpoint` does not verify with `public_key` (or with the
    certificates of `chain`), or None when it does."""
    from model_signing import verifying

    config = verifying.Config().set_hashing_config(_hashing())
    try:
        if public_key is not None:
            config.use_elliptic_key_verifier(public_key=public_key)
        else:
            config.use_certificate_verifier(certificate_chain=chain)
        config.verify(checkpoint, checkpoint / SIGNATURE)
    except Exception as error:  # noqa: BLE001 - the library raises several kinds; all mean "no"
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return None
