"""Content credentials: a signed C2PA manifest in each image file, saying it is AI-made.

Signed with c2pa-python (the Content Authenticity Initiative's bindings of c2pa-rs). Each
manifest holds a `c2pa.actions` assertion (action `c2pa.created`, digital source type
`trainedAlgorithmicMedia`: the IPTC term for AI-generated media, software agent daguerre)
and `ai.daguerre.provenance`, the caller's provenance fields (what the metadata row says).

- c2pa-rs stores the actions as `c2pa.actions.v2` (claim version 2); readers see that label.
- c2pa-rs adds a 1024-px thumbnail to every manifest by default: +75 ms and +0.9 MB per
  512x512 PNG here. It is turned off (SIGN_SETTINGS); signing then takes about 2 ms.
- c2pa wants PKCS#8 keys; SEC1 ("EC PRIVATE KEY") and PKCS#1 keys are converted on load.
- A Credentials holds native handles: build it in the process that signs (`sign` caches
  one per config and process), never pickle it. One may sign from many threads at once.
- With no trust anchors a self-signed chain reads back as `Valid` with the one failure
  `signingCredential.untrusted`; given its root (`trust_anchors`), as `Trusted`.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import daguerre

MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")
AI_GENERATED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
PROVENANCE_LABEL = "ai.daguerre.provenance"
UNTRUSTED = "signingCredential.untrusted"  # the chain's root is in no trust list
SIGN_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}}
READ_SETTINGS = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}

Algorithm = Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"]
ALGORITHM_KEYS = {  # the key each signing algorithm needs (c2pa-rs and the C2PA spec)
    "es256": "EC P-256", "es384": "EC P-384", "es512": "EC P-521", "ps256": "RSA",
    "ps384": "RSA", "ps512": "RSA", "ed25519": "Ed25519",
}  # fmt: skip
EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


class CredentialsError(RuntimeError):
    """Signing or reading content credentials failed; the message gives c2pa's reason."""


class CredentialsConfig(BaseModel):
    """Whether and with what each image is signed (`credentials:` in a job or serve config)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Sign every image with C2PA content credentials.")
    cert_file: str | None = Field(
        None, description="PEM certificate chain, leaf (signing) certificate first."
    )
    key_file: str | None = Field(None, description="PEM private key of the leaf certificate.")
    algorithm: Algorithm = Field(
        "es256",
        description="Signing algorithm: es256/es384/es512 (EC P-256/384/521 keys), "
        "ps256/ps384/ps512 (RSA, at least 2048 bits), ed25519.",
    )
    claim_generator: str = Field("daguerre", description="Name in the claim_generator_info.")
    tsa_url: str | None = Field(
        None, description="RFC 3161 timestamp authority (http or https URL); null: none."
    )

    @model_validator(mode="after")
    def _files_when_enabled(self) -> CredentialsConfig:
        bad = [f for f in ("cert_file", "key_file") if self.enabled and not getattr(self, f)]
        if self.tsa_url and not self.tsa_url.startswith(("http://", "https://")):
            bad.append("tsa_url")
        if bad:  # errors at the field's own location, so they read `credentials.key_file`
            raise ValidationError.from_exception_data(
                "CredentialsConfig", [_field_error(f, getattr(self, f)) for f in bad]
            )
        return self


def _field_error(field: str, value: Any) -> Any:
    """A pydantic error (InitErrorDetails) for `field` of CredentialsConfig."""
    reason = "is not an http(s) URL" if field == "tsa_url" else "must be set when enabled"
    return {"type": "value_error", "loc": (field,), "input": value,
            "ctx": {"error": ValueError(reason)}}  # fmt: skip


NO_CREDENTIALS = CredentialsConfig()


def check_credentials(config: CredentialsConfig) -> None:
    """ConfigError with one line naming the field when `config` cannot sign here: c2pa
    missing, a file missing or unreadable, a key that does not parse or fit, a failed trial."""
    from .config import ConfigError

    if not config.enabled:
        return
    try:
        import c2pa  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"credentials.enabled: needs c2pa-python ({exc}); install it with "
                          "pip install 'daguerre[credentials]'") from None  # fmt: skip
    credentials = credentials_for(config)
    # A trial of the whole path: c2pa-rs checks the certificate profile when signing.
    try:
        report = read_credentials(credentials.sign(_tiny_png(), "image/png", {}), "image/png")
    except CredentialsError as exc:
        raise ConfigError(f"credentials.cert_file: a trial signing with credentials.key_file"
                          f"{' and credentials.tsa_url' if config.tsa_url else ''} failed "
                          f"({exc})") from None  # fmt: skip
    errors = [code for code in report["failures"] if code != UNTRUSTED]
    if errors:
        raise ConfigError(f"credentials.cert_file: a trial signature does not validate "
                          f"({', '.join(errors)})")  # fmt: skip


def sign(data: bytes, mime: str, fields: dict[str, Any], config: CredentialsConfig) -> bytes:
    """`data` (an image of type `mime`) with a signed C2PA manifest holding `fields`, or
    `data` unchanged when credentials are not enabled. Builds the signer once per config."""
    if not config.enabled:
        return data
    return credentials_for(config).sign(data, mime, fields)


_BUILT: dict[str, Credentials] = {}
_BUILT_LOCK = threading.Lock()


def credentials_for(config: CredentialsConfig) -> Credentials:
    """The Credentials for `config`, built on first use in this process and kept (a change
    to the files on disk is seen by new processes only)."""
    key = config.model_dump_json()
    with _BUILT_LOCK:
        if key not in _BUILT:
            _BUILT[key] = Credentials(config)
        return _BUILT[key]


class Credentials:
    """A c2pa signer and signing context built from a CredentialsConfig (the files read and
    checked once); `sign` embeds a new manifest per image."""

    def __init__(self, config: CredentialsConfig):
        import c2pa

        from .config import ConfigError, first_line

        chain, key = _signing_material(config)
        try:
            info = c2pa.C2paSignerInfo(config.algorithm, chain, key, config.tsa_url)
            self._signer = c2pa.Signer.from_info(info)
        except c2pa.C2paError as exc:
            raise ConfigError(f"credentials.key_file: c2pa cannot sign with it "
                              f"({first_line(exc)})") from None  # fmt: skip
        self._context = c2pa.Context.from_dict(SIGN_SETTINGS)
        self.config = config

    def manifest(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The manifest definition for one image: title (the request id, `fields["id"]`),
        the AI-created action and the provenance `fields`."""
        agent = {"name": "daguerre", "version": daguerre.__version__}
        created = {"action": "c2pa.created", "digitalSourceType": AI_GENERATED,
                   "softwareAgent": agent}  # fmt: skip
        return {
            "claim_generator_info": [
                {"name": self.config.claim_generator, "version": daguerre.__version__}
            ],
            "title": str(fields.get("id") or "daguerre image"),
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [created]}},
                {"label": PROVENANCE_LABEL, "data": fields},
            ],
        }

    def sign(self, data: bytes, mime: str, fields: dict[str, Any]) -> bytes:
        """`data` with a signed manifest embedded (`mime`: one of MEDIA_TYPES)."""
        import c2pa

        from .config import first_line

        _check_mime(mime)
        definition = json.dumps(self.manifest(fields), default=str)
        signed = io.BytesIO()
        try:
            with c2pa.Builder(definition, self._context) as builder:
                builder.sign(self._signer, mime, io.BytesIO(data), signed)
        except c2pa.C2paError as exc:
            raise CredentialsError(f"c2pa could not sign the {mime} image: "
                                   f"{first_line(exc)}") from None  # fmt: skip
        return signed.getvalue()


def read_credentials(data: bytes, mime: str, trust_anchors: str | None = None) -> dict[str, Any]:
    """The active manifest of `data`, validated: title, claim_generator_info, signature_info,
    assertions (label -> data), validation_state (Invalid, Valid or, when `trust_anchors`
    (PEM roots) holds its root, Trusted), failures (codes), validation_results (c2pa's own).
    {} when `data` has no manifest. Nothing is fetched over the network."""
    import c2pa

    from .config import first_line

    _check_mime(mime)
    trust = {"trust": {"user_anchors": trust_anchors}} if trust_anchors else {}
    settings = {**READ_SETTINGS, **trust}
    try:
        with c2pa.Context.from_dict(settings) as context:
            reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
            if reader is None:
                return {}
            with reader:
                manifest = reader.get_active_manifest() or {}
                state, results = reader.get_validation_state(), reader.get_validation_results()
    except c2pa.C2paError as exc:
        raise CredentialsError(f"c2pa could not read the {mime} image: {first_line(exc)}") from None
    failures = (results or {}).get("activeManifest", {}).get("failure", [])
    return {
        "title": manifest.get("title"),
        "claim_generator_info": manifest.get("claim_generator_info"),
        "signature_info": manifest.get("signature_info"),
        "assertions": {a["label"]: a.get("data") for a in manifest.get("assertions", [])},
        "validation_state": state,
        "failures": sorted({f["code"] for f in failures}),
        "validation_results": results,
    }


def _signing_material(config: CredentialsConfig) -> tuple[bytes, bytes]:
    """(the certificate chain as PEM, the private key as PKCS#8 PEM), checked: the chain
    parses, the key parses, fits `config.algorithm` and belongs to the first certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization as ser

    from .config import ConfigError, first_line

    chain_pem, key_pem = _read(config.cert_file, "cert_file"), _read(config.key_file, "key_file")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ConfigError(f"credentials.cert_file: {config.cert_file} holds no PEM "
                          f"certificate chain ({first_line(exc)})") from None  # fmt: skip
    try:
        key = ser.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"credentials.key_file: {config.key_file} is not an unencrypted "
                          f"PEM private key ({first_line(exc)})") from None  # fmt: skip
    kind, needed = _key_kind(key), ALGORITHM_KEYS[config.algorithm]
    if not kind.startswith(needed):
        fits = [alg for alg, k in ALGORITHM_KEYS.items() if kind.startswith(k)]
        raise ConfigError(f"credentials.algorithm: {config.algorithm} needs an {needed} key, "
                          f"credentials.key_file holds an {kind} key (use one of: "
                          f"{', '.join(fits) or 'none; c2pa cannot sign with it'})")  # fmt: skip
    if kind.startswith("RSA") and key.key_size < 2048:
        raise ConfigError(f"credentials.key_file: an {kind} key; C2PA needs at least 2048 bits")
    spki = (ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        raise ConfigError("credentials.key_file: not the key of the first certificate in "
                          f"{config.cert_file} (the chain goes leaf first)")  # fmt: skip
    chain = b"".join(cert.public_bytes(ser.Encoding.PEM) for cert in certs)
    pkcs8 = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    return chain, pkcs8


def _read(path: str | None, field: str) -> bytes:
    """The bytes of the file `credentials.<field>` names."""
    from .config import ConfigError

    if not path:
        raise ConfigError(f"credentials.{field}: must be set when credentials are enabled")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"credentials.{field}: cannot read {path} "
                          f"({exc.strerror or type(exc).__name__})") from None  # fmt: skip


def _key_kind(key: Any) -> str:
    """What kind of key `key` is, in ALGORITHM_KEYS's words: 'EC P-256', 'RSA 3072-bit', ..."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {EC_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}-bit"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "Ed25519"
    return type(key).__name__.removeprefix("_")


def _check_mime(mime: str) -> None:
    """ValueError unless `mime` is one of MEDIA_TYPES."""
    if mime not in MEDIA_TYPES:
        raise ValueError(f"mime: {mime!r} cannot carry credentials here; use one of "
                         f"{', '.join(MEDIA_TYPES)}")  # fmt: skip


def _tiny_png() -> bytes:
    """An 8x8 PNG for the trial signing."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()
