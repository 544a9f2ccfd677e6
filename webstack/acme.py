"""A small ACME (RFC 8555) client for the control machine: an account, an order, HTTP-01, a certificate.

Only what ``webstack certificate`` needs: an ES256 account key (a P-256 PEM, kept in the
inventory's secrets), one order for a list of DNS names, HTTP-01 challenges whose files the
caller publishes (:class:`Client.order` calls ``publish(token, key_authorization)`` and
``withdraw(token)``), and the issued chain. Nonces are retried on ``badNonce`` (servers reject
some on purpose; pebble does by default). Standard library plus ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


class AcmeError(Exception):
    """The ACME server refused or failed a step; the message carries its problem document."""


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {"crv": "P-256", "kty": "EC", "x": b64(numbers.x.to_bytes(32, "big")), "y": b64(numbers.y.to_bytes(32, "big"))}


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """RFC 7638 thumbprint of the account key: the JSON of its required members, sorted, no spaces."""
    return b64(hashlib.sha256(json.dumps(jwk(key), sort_keys=True, separators=(",", ":")).encode()).digest())


def sign_es256(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """An ES256 JWS signature: r and s, 32 bytes each (not DER)."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def csr_for(names: list[str], key: ec.EllipticCurvePrivateKey) -> bytes:
    """A DER certificate request for ``names`` (the first as common name too)."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, Any]:
        return json.loads(self.body or b"{}")


class Client:
    """One account at one ACME directory."""

    def __init__(self, directory: str, account_key_pem: str, ca_file: str = "", timeout: float = 30,
                 poll_s: float = 1.0, deadline_s: float = 180) -> None:
        key = serialization.load_pem_private_key(account_key_pem.encode(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise AcmeError("the ACME account key must be an ECDSA P-256 key")
        self.key = key
        self.context = ssl.create_default_context(cafile=ca_file or None)
        self.timeout, self.poll_s, self.deadline_s = timeout, poll_s, deadline_s
        self.directory = self._request("GET", directory).json()
        self.nonce = ""
        self.kid = ""

    # --- transport ------------------------------------------------------------------------------------------

    def _request(self, method: str, url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None) -> Response:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=self.context, timeout=self.timeout) as resp:
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())
        except urllib.error.URLError as e:
            raise AcmeError(f"{method} {url}: {e.reason}") from e

    def _fresh_nonce(self) -> str:
        if self.nonce:
            nonce, self.nonce = self.nonce, ""
            return nonce
        return self._request("HEAD", self.directory["newNonce"]).headers["replay-nonce"]

    def post(self, url: str, payload: dict[str, Any] | None, accept: str = "") -> Response:
        """A signed POST (``payload`` None: POST-as-GET), retried on badNonce."""
        for _attempt in range(10):
            protected: dict[str, Any] = {"alg": "ES256", "nonce": self._fresh_nonce(), "url": url}
            protected.update({"kid": self.kid} if self.kid else {"jwk": jwk(self.key)})
            head = b64(json.dumps(protected).encode())
            body = "" if payload is None else b64(json.dumps(payload).encode())
            jws = {"protected": head, "payload": body,
                   "signature": b64(sign_es256(self.key, f"{head}.{body}".encode()))}
            headers = {"Content-Type": "application/jose+json", **({"Accept": accept} if accept else {})}
            resp = self._request("POST", url, json.dumps(jws).encode(), headers)
            self.nonce = resp.headers.get("replay-nonce", "")
            if resp.status >= 400:
                problem = resp.json() if resp.body.startswith(b"{") else {"detail": resp.body.decode(errors="replace")}
                if problem.get("type") == "urn:ietf:params:acme:error:badNonce":
                    continue
                raise AcmeError(f"{url}: {resp.status} {problem.get('type', '')}: {problem.get('detail', '')}")
            return resp
        raise AcmeError(f"{url}: the server refused 10 nonces in a row")

    # --- protocol --------------------------------------------------------------------------------------------

    def account(self, email: str = "") -> str:
        """Register the key (or find its account): the account URL."""
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if email:
            payload["contact"] = [f"mailto:{email}"]
        self.kid = self.post(self.directory["newAccount"], payload).headers["location"]
        return self.kid

    def _poll(self, url: str, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.deadline_s
        while True:
            state = self.post(url, None).json()
            if state.get("status") == "invalid":
                raise AcmeError(f"{what} is invalid: {json.dumps(state.get('error') or state)[:2000]}")
            if done(state):
                return state
            if time.monotonic() > deadline:
                raise AcmeError(f"{what}: still {state.get('status')} after {self.deadline_s:.0f} s")
            time.sleep(self.poll_s)

    def order(self, names: list[str], publish: Callable[[str, str], None],
              withdraw: Callable[[str], None]) -> tuple[str, str]:
        """Order a certificate for ``names`` with HTTP-01: (key PEM, certificate chain PEM)."""
        if not self.kid:
            self.account()
        created = self.post(self.directory["newOrder"],
                            {"identifiers": [{"type": "dns", "value": n} for n in names]})
        order_url, order = created.headers["location"], created.json()
        published: list[str] = []
        try:
            for authz_url in order["authorizations"]:
                authz = self.post(authz_url, None).json()
                if authz.get("status") == "valid":
                    continue  # an authorization this account already holds
                challenge = next((c for c in authz["challenges"] if c["type"] == "http-01"), None)
                if challenge is None:
                    raise AcmeError(f"{authz['identifier']['value']}: the server offers no http-01 challenge")
                token = challenge["token"]
                published.append(token)  # before: a publication that fails halfway is withdrawn too
                publish(token, f"{token}.{thumbprint(self.key)}")
                self.post(challenge["url"], {})
                self._poll(authz_url, lambda a: a.get("status") == "valid", f"authorization of {authz['identifier']['value']}")
        finally:
            for token in published:
                withdraw(token)
        key = ec.generate_private_key(ec.SECP256R1())
        self._poll(order_url, lambda o: o.get("status") in ("ready", "valid"), "order")
        self.post(order["finalize"], {"csr": b64(csr_for(names, key))})
        final = self._poll(order_url, lambda o: o.get("status") == "valid", "order")
        chain = self.post(final["certificate"], None, accept="application/pem-certificate-chain").body.decode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return key_pem, chain
