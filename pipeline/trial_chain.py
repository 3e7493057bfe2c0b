"""A throwaway certificate chain for trying content credentials (`daguerre credentials init`).

A root CA and a signing leaf (EC P-256), in the profile c2pa-rs checks when it signs: X.509
v3, critical key usage (the leaf: digitalSignature only), subject and authority key ids, an
extended key usage c2pa accepts (email protection). Readers see such files as `Valid` but
untrusted: for real catalogues use a certificate from a CA on the C2PA trust list.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

CHAIN, KEY, ROOT = "chain.pem", "key.pem", "root.pem"


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "daguerre trial")])  # fmt: skip


def _certificate(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool,
                 days: int) -> Any:  # fmt: skip
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = dt.datetime.now(dt.timezone.utc)
    usage = x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False)  # fmt: skip
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), False)
    )  # fmt: skip
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_trial_chain(folder: str | Path, name: str = "daguerre trial", days: int = 365) -> dict:
    """Write chain.pem (leaf, then root), key.pem (the leaf's key, PKCS#8) and root.pem (the
    trust anchor a verifier may pass) into `folder`; their paths by name."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    root = _certificate(f"{name} root", root_key, f"{name} root", root_key, ca=True, days=days)
    leaf = _certificate(f"{name} signer", leaf_key, f"{name} root", root_key, ca=False, days=days)
    pem = serialization.Encoding.PEM
    (folder / CHAIN).write_bytes(leaf.public_bytes(pem) + root.public_bytes(pem))
    (folder / ROOT).write_bytes(root.public_bytes(pem))
    key = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())  # fmt: skip
    (folder / KEY).write_bytes(key)
    (folder / KEY).chmod(0o600)
    return {"cert_file": str(folder / CHAIN), "key_file": str(folder / KEY),
            "root": str(folder / ROOT)}  # fmt: skip
