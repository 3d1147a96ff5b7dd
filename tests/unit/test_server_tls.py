"""HTTPS files checked before the service starts: one line naming the setting at fault."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from order_viewer.config import Settings
from order_viewer.entrypoints.server import serve, tls_problem
from tests.conftest import free_port
from tests.tls import key_pem, self_signed_pair


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_pair(tmp_path)


def test_a_certificate_and_its_key_are_fit(pair: tuple[Path, Path]) -> None:
    assert tls_problem(*pair) is None


CERT_MISSING = "HTTP_TLS_CERT_FILE {cert}: cannot read it: No such file or directory"
KEY_MISSING = "HTTP_TLS_KEY_FILE {key}: cannot read it: No such file or directory"
NO_CERTIFICATE = "HTTP_TLS_CERT_FILE {cert}: no PEM certificate in it"
NO_KEY = "HTTP_TLS_KEY_FILE {key}: no unencrypted PEM private key in it"
WRONG_KEY = "HTTP_TLS_KEY_FILE {key}: not the key of the HTTP_TLS_CERT_FILE certificate"
GARBAGE = b"-----BEGIN CERTIFICATE-----\nnot base64 \x00\xff\n-----END CERTIFICATE-----\n"


def spoiled(cert_file: Path, key_file: Path, spoil: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    if spoil == "cert missing":
        cert_file.unlink()
    elif spoil == "key missing":
        key_file.unlink()
    elif spoil == "cert a directory":
        cert_file.unlink()
        cert_file.mkdir()
    elif spoil == "cert empty":
        cert_file.write_bytes(b"")
    elif spoil == "cert garbage":
        cert_file.write_bytes(GARBAGE)
    elif spoil == "cert is the key":
        cert_file.write_bytes(key_file.read_bytes())
    elif spoil == "key garbage":
        key_file.write_bytes(GARBAGE)
    elif spoil == "key binary":
        key_file.write_bytes(bytes(range(256)) * 16)
    elif spoil == "key is the cert":
        key_file.write_bytes(cert_file.read_bytes())
    elif spoil == "key encrypted":
        key_file.write_bytes(key_pem(key, password=b"secret"))
    elif spoil == "key of another cert":
        key_file.write_bytes(key_pem(key))
    else:
        raise AssertionError(spoil)


@pytest.mark.parametrize(
    ("spoil", "problem"),
    [
        ("cert missing", CERT_MISSING),
        ("key missing", KEY_MISSING),
        ("cert a directory", "HTTP_TLS_CERT_FILE {cert}: cannot read it: Is a directory"),
        ("cert empty", NO_CERTIFICATE),
        ("cert garbage", NO_CERTIFICATE),
        ("cert is the key", NO_CERTIFICATE),
        ("key garbage", NO_KEY),
        ("key binary", NO_KEY),
        ("key is the cert", NO_KEY),
        ("key encrypted", NO_KEY),
        ("key of another cert", WRONG_KEY),
    ],
)
def test_an_unfit_file_is_named_with_its_setting(
    pair: tuple[Path, Path], spoil: str, problem: str
) -> None:
    cert_file, key_file = pair
    spoiled(cert_file, key_file, spoil)
    assert tls_problem(cert_file, key_file) == problem.format(cert=cert_file, key=key_file)


def test_serve_stops_on_an_unfit_file_with_one_line_before_it_builds_anything(
    pair: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cert_file, key_file = pair
    key_file.write_bytes(GARBAGE)
    settings = Settings(
        _env_file=None,
        http_port=free_port(),
        http_tls_cert_file=cert_file,
        http_tls_key_file=key_file,
        # Nothing listens there: start-up must stop before it connects to anything.
        database_url="postgresql://order_viewer:secret@127.0.0.1:1/order_viewer",
        kafka_bootstrap_servers="127.0.0.1:1",
    )
    assert serve(settings, None) == 1
    assert [
        record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR
    ] == [f"cannot serve HTTPS: {NO_KEY.format(key=key_file)}"]
