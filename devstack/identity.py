"""A small identity provider for the tests and the benchmarks: keys it generates, their JWKS
(as bytes, or served over HTTP on loopback), tokens signed with them, and the forged tokens an
attacker would try."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://id.example.test/"
AUDIENCE = "order-viewer"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdentityProvider:
    """One RSA, one EC P-256 and one Ed25519 key, each with its `kid`."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
            "ed-1": ed25519.Ed25519PrivateKey.generate(),
        }
        self.algorithms = {"rsa-1": "RS256", "ec-1": "ES256", "ed-1": "EdDSA"}
        self.published = set(self.keys)
        self.requests = 0
        # The Cache-Control its JWKS answers carry; None: no such header.
        self.cache_control: str | None = None

    def add_key(self, kid: str) -> None:
        """A new RSA key, published from now on (a provider rotating its keys)."""
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.algorithms[kid] = "RS256"
        self.published.add(kid)

    def withdraw(self, kid: str) -> None:
        """The key no longer published (a provider retiring a key, or one that leaked)."""
        self.published.discard(kid)

    def jwks(self) -> bytes:
        keys = []
        for kid in sorted(self.published):
            algorithm = jwt.get_algorithm_by_name(self.algorithms[kid])
            entry = json.loads(algorithm.to_jwk(self.keys[kid].public_key()))
            keys.append({**entry, "kid": kid, "use": "sig"})
        return json.dumps({"keys": keys}).encode()

    def fetch(self, _: str) -> tuple[bytes, str | None]:
        """The answer the JWKS fetch (`fetch_url` of order_viewer.adapters.http.auth.jwt) would
        give: the JWKS and its Cache-Control."""
        self.requests += 1
        return self.jwks(), self.cache_control

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
            "scope": "orders:read",
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self, kid: str = "rsa-1", headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        return jwt.encode(
            self.claims(**claims),
            self.keys[kid],
            algorithm=self.algorithms[kid],
            headers={"kid": kid, **(headers or {})},
        )

    def unsigned_token(self, **claims: Any) -> str:
        """`alg: none`: no signature at all."""
        header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": "rsa-1"}).encode())
        return f"{header}.{_b64(json.dumps(self.claims(**claims)).encode())}."

    def hmac_with_public_key(self, kid: str = "rsa-1", **claims: Any) -> str:
        """HS256 keyed with the published public key: the key-confusion attack."""
        pem = (
            self.keys[kid]
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        payload = _b64(json.dumps(self.claims(**claims)).encode())
        signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(signature)}"


@contextmanager
def serve_jwks(provider: IdentityProvider) -> Iterator[str]:
    """The provider's JWKS over HTTP on 127.0.0.1; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            provider.requests += 1
            body = provider.jwks()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if provider.cache_control is not None:
                self.send_header("Cache-Control", provider.cache_control)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
