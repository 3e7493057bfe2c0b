"""Content credentials (credentials:): PNG, JPEG and WebP images signed with a throwaway
certificate chain read back with c2pa as AI-made, with their provenance, and still decode
to the same pixels; a tampered file fails validation; bad configs fail in one line."""

from __future__ import annotations

import datetime as dt
import io
import threading

import numpy as np
import pytest
from pydantic import BaseModel

pytest.importorskip("c2pa", reason="needs c2pa-python: pip install 'daguerre[credentials]'")
pytest.importorskip("cryptography", reason="needs cryptography (c2pa-python's dependency)")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402
from daguerre.pipeline.config import ConfigError, validate_config  # noqa: E402
from daguerre.pipeline.credentials import (  # noqa: E402
    AI_GENERATED,
    PROVENANCE_LABEL,
    CredentialsConfig,
    check_credentials,
    credentials_for,
    read_credentials,
    sign,
)
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.timeout(60)
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
FIELDS = {"id": "req-0001", "prompt": "a red fox", "seed": 7, "steps": 4, "model": "tiny",
          "weights_hash": "ab" * 32, "run_id": "20261202T120000000Z-1a2b3c",
          "guidance_scale": 7.5, "ai_generated": True, "watermark": None}  # fmt: skip
NOW = dt.datetime.now(dt.timezone.utc)
KEY_USAGE = dict(content_commitment=False, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, encipher_only=False, decipher_only=False)  # fmt: skip


def dn(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "daguerre tests")])  # fmt: skip


def certificate(subject: str, key, issuer_key, issuer: str, *, ca: bool, eku: bool = True):
    """An X.509 v3 certificate in the profile c2pa-rs checks: key usage (critical), subject
    and authority key ids; a leaf has digitalSignature (no keyCertSign) and an EKU c2pa-rs
    accepts (email protection)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(dn(subject))
        .issuer_name(dn(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **KEY_USAGE),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if eku and not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A throwaway root CA -> leaf signing chain (EC P-256) in files: (config, root PEM,
    the folder, the leaf key, the root key)."""
    folder = tmp_path_factory.mktemp("credentials")
    root_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    root = certificate("daguerre test root", root_key, root_key, "daguerre test root", ca=True)
    leaf = certificate("daguerre test signer", leaf_key, root_key, "daguerre test root", ca=False)
    (folder / "chain.pem").write_bytes(pem(leaf) + pem(root))
    (folder / "key.pem").write_bytes(key_pem(leaf_key))
    config = CredentialsConfig(enabled=True, cert_file=str(folder / "chain.pem"),
                               key_file=str(folder / "key.pem"))  # fmt: skip
    return config, pem(root).decode(), folder, leaf_key, root_key


def image_bytes(pixels: np.ndarray, mime: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, FORMATS[mime])
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


PIXELS = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("mime", FORMATS)
def test_a_signed_image_reads_back_as_ai_made_with_its_provenance(chain, mime):
    config, _, _, _, _ = chain
    unsigned = image_bytes(PIXELS, mime)
    signed = sign(unsigned, mime, FIELDS, config)
    report = read_credentials(signed, mime)

    assert report["title"] == "req-0001"
    (created,) = report["assertions"]["c2pa.actions.v2"]["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == AI_GENERATED
    assert created["softwareAgent"]["name"] == "daguerre"
    assert report["assertions"][PROVENANCE_LABEL] == FIELDS
    assert report["claim_generator_info"][0]["name"] == "daguerre"
    # A self-signed root is in no trust list: valid, and untrusted its only failure.
    assert report["validation_state"] == "Valid"
    assert report["failures"] == ["signingCredential.untrusted"]
    assert np.array_equal(decoded(signed), decoded(unsigned))
    if mime == "image/png":
        assert np.array_equal(decoded(signed), PIXELS)


def test_the_chains_root_as_trust_anchor_makes_it_trusted(chain):
    config, root, _, _, _ = chain
    signed = sign(image_bytes(PIXELS, "image/png"), "image/png", FIELDS, config)
    report = read_credentials(signed, "image/png", trust_anchors=root)
    assert (report["validation_state"], report["failures"]) == ("Trusted", [])


@pytest.mark.parametrize("mime", FORMATS)
def test_a_tampered_image_fails_validation(chain, mime):
    config, _, _, _, _ = chain
    unsigned = image_bytes(PIXELS, mime)
    signed = bytearray(sign(unsigned, mime, FIELDS, config))
    at = signed.find(unsigned[-48:-16])  # in the image data, past the manifest
    assert at > 0
    signed[at] ^= 0xFF
    report = read_credentials(bytes(signed), mime)
    assert report["validation_state"] == "Invalid"
    assert "assertion.dataHash.mismatch" in report["failures"]


def test_an_unsigned_image_has_no_credentials():
    assert read_credentials(image_bytes(PIXELS, "image/png"), "image/png") == {}


def test_disabled_credentials_leave_the_bytes_alone():
    unsigned = image_bytes(PIXELS, "image/png")
    assert sign(unsigned, "image/png", FIELDS, CredentialsConfig()) is unsigned


def test_one_signer_per_config_signs_from_many_threads(chain):
    config, _, _, _, _ = chain
    assert credentials_for(config) is credentials_for(config.model_copy())
    unsigned, states = image_bytes(PIXELS, "image/png"), []

    def work():
        for _ in range(5):
            signed = sign(unsigned, "image/png", FIELDS, config)
            states.append(read_credentials(signed, "image/png")["validation_state"])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert states == ["Valid"] * 20


def test_a_good_chain_passes_the_check_and_an_sec1_key_is_converted(chain):
    config, _, folder, leaf_key, _ = chain
    check_credentials(config)
    sec1 = folder / "key-sec1.pem"
    sec1.write_bytes(key_pem(leaf_key, serialization.PrivateFormat.TraditionalOpenSSL))
    check_credentials(config.model_copy(update={"key_file": str(sec1)}))


@pytest.mark.parametrize(
    "algorithm, make_key",
    [
        ("es384", lambda: ec.generate_private_key(ec.SECP384R1())),
        ("ps256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ed25519", ed25519.Ed25519PrivateKey.generate),
    ],
)
def test_each_key_kind_signs_with_its_algorithm(chain, algorithm, make_key):
    config, _, folder, _, root_key = chain
    leaf_key = make_key()
    leaf = certificate(algorithm, leaf_key, root_key, "daguerre test root", ca=False)
    (folder / f"{algorithm}.pem").write_bytes(pem(leaf))
    (folder / f"{algorithm}-key.pem").write_bytes(key_pem(leaf_key))
    config = config.model_copy(update={"cert_file": str(folder / f"{algorithm}.pem"),
                                       "key_file": str(folder / f"{algorithm}-key.pem"),
                                       "algorithm": algorithm})  # fmt: skip
    check_credentials(config)
    signed = sign(image_bytes(PIXELS, "image/png"), "image/png", FIELDS, config)
    report = read_credentials(signed, "image/png")
    assert report["signature_info"]["alg"].lower() == algorithm
    assert report["validation_state"] == "Valid"


def one_line_error(config: CredentialsConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        check_credentials(config)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_bad_key_files_fail_the_check_in_one_line_naming_the_field(chain):
    config, _, folder, _, root_key = chain
    missing = config.model_copy(update={"key_file": str(folder / "absent.pem")})
    assert one_line_error(missing).startswith("credentials.key_file: cannot read ")
    (folder / "garbage.pem").write_text("not a key\n")
    garbage = config.model_copy(update={"key_file": str(folder / "garbage.pem")})
    assert "is not an unencrypted PEM private key" in one_line_error(garbage)
    (folder / "other.pem").write_bytes(key_pem(root_key))
    other = config.model_copy(update={"key_file": str(folder / "other.pem")})
    assert one_line_error(other).startswith("credentials.key_file: not the key of the first")
    es384 = config.model_copy(update={"algorithm": "es384"})
    assert one_line_error(es384).startswith(
        "credentials.algorithm: es384 needs an EC P-384 key, credentials.key_file holds an "
        "EC P-256 key (use one of: es256)"
    )


def test_a_leaf_without_the_c2pa_key_usage_fails_the_trial_signing(chain):
    config, _, folder, _, root_key = chain
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate("no eku", leaf_key, root_key, "daguerre test root", ca=False, eku=False)
    (folder / "no-eku.pem").write_bytes(pem(leaf))
    (folder / "no-eku-key.pem").write_bytes(key_pem(leaf_key))
    bad = config.model_copy(update={"cert_file": str(folder / "no-eku.pem"),
                                    "key_file": str(folder / "no-eku-key.pem")})  # fmt: skip
    message = one_line_error(bad)
    assert message.startswith("credentials.cert_file: a trial signing")
    assert "the certificate is invalid" in message  # c2pa's own reason


class Deployment(BaseModel):
    """A config holding credentials, as a job or serve config does."""

    credentials: CredentialsConfig = CredentialsConfig()


def test_enabled_credentials_need_both_files():
    with pytest.raises(ConfigError) as caught:
        validate_config(Deployment, {"credentials": {"enabled": True, "cert_file": "c.pem"}})
    assert str(caught.value) == "config: credentials.key_file: None must be set when enabled"
    with pytest.raises(ConfigError) as caught:
        validate_config(Deployment, {"credentials": {"enabled": True}})
    lines = str(caught.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "credentials.cert_file",
        "credentials.key_file",
    ]
    assert validate_config(Deployment, {}).credentials.enabled is False


def test_the_write_path_signs_the_master_and_every_variant(chain, tmp_path):
    from daguerre.pipeline.files import Provenance, WriteOptions
    from daguerre.pipeline.formats import EncodingConfig, Variant
    from daguerre.pipeline.outputs import write_outputs
    from daguerre.pipeline.schema import GeneratedImage, ImageRequest, StageTimings
    from daguerre.pipeline.storage import Storage

    config, *_ = chain
    image = GeneratedImage(request=ImageRequest(id="sku-1", prompt="a red fox", seed=7),
                           image=PIXELS, seed=7, width=64, height=64, batch_size=1,
                           scheduler_config="{}", timings=StageTimings())  # fmt: skip
    provenance = Provenance(model="tiny", weights_hash="ab" * 8, backend={}, node_id="n",
                            actor_id="a")  # fmt: skip
    encoding = EncodingConfig(format="webp", variants=[Variant(name="thumb", width=32,
                                                               format="png")])  # fmt: skip
    options = WriteOptions(encoding=encoding, credentials=config)
    [stored] = write_outputs([(image, provenance)], Storage(str(tmp_path)), run_id="run-1",
                             version="t", options=options)  # fmt: skip
    assert stored.record.content_credentials is True
    for path, mime in ((tmp_path / "images/sku-1.webp", "image/webp"),
                       (tmp_path / "variants/thumb/sku-1.png", "image/png")):  # fmt: skip
        report = read_credentials(path.read_bytes(), mime)
        provenance_read = report["assertions"][PROVENANCE_LABEL]
        assert provenance_read["id"] == "sku-1" and provenance_read["seed"] == 7
        assert provenance_read["weights_hash"] == "ab" * 8 and provenance_read["run_id"] == "run-1"
        assert report["failures"] == ["signingCredential.untrusted"]


def test_a_missing_key_fails_the_serve_app_before_any_replica(chain):
    from daguerre.cluster.serve import build_app
    from daguerre.pipeline.config import ServeConfig

    config, *_ = chain
    broken = config.model_copy(update={"key_file": "/nonexistent/key.pem"})
    with pytest.raises(ConfigError, match=r"^credentials\.key_file: cannot read /nonexistent"):
        build_app(ServeConfig(credentials=broken))
