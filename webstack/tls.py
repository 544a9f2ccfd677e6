"""Certificates on the control machine: the lab's own CA, and issuing from it.

Production takes its certificate from secrets (``tls_cert``, ``tls_key``) or
from certbot; the lab makes a CA whose key stays in the lab's secrets.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def make_ca(name: str = "webstack lab CA", days: int = 3650) -> tuple[str, str]:
    """A self-signed CA: (key PEM, certificate PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        # Key identifiers: Python 3.13's default TLS context (VERIFY_X509_STRICT) refuses chains without.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM).decode()


def issue(ca_key_pem: str, ca_cert_pem: str, names: list[str], ips: list[str], days: int = 199) -> tuple[str, str]:
    """A server certificate for ``names`` and ``ips``: (key PEM, certificate chain PEM). 199 days by
    default: public CAs may not issue for longer than 200 days from March 2026 (CA/B Forum SC-081)."""
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem.encode())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    chain = cert.public_bytes(serialization.Encoding.PEM).decode() + ca_cert_pem
    return _pem_key(key), chain


def key_matches_certificate(key_pem: str, cert_pem: str) -> bool:
    """Whether the private key belongs to the first certificate of the PEM chain."""
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def not_after(cert_pem: str) -> dt.datetime:
    """Expiry of the first certificate in a PEM chain."""
    return x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc


# --- pgBackRest's TLS between cluster members: everything derived from one Ed25519 key -------------
# Ed25519 signatures are deterministic, so the CA and every member's certificate are
# pure functions of the cluster's secret and the member's name: rerunning a deploy
# re-renders identical files (no change), and nothing but the one key is stored.

_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_END = dt.datetime(2125, 1, 1, tzinfo=dt.UTC)


def new_ed25519_key() -> str:
    """A new Ed25519 private key, PKCS#8 PEM."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def _ed25519(pem: str):
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = serialization.load_pem_private_key(pem.encode(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def _serial(label: bytes, name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(label + name.encode()).digest()[:16], "big") >> 1


def _derived_ca_builder(key, name: str, serial: int) -> x509.CertificateBuilder:
    """A self-signed CA named ``name`` for ``key``, valid from _EPOCH to _END (unsigned)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(serial).not_valid_before(_EPOCH).not_valid_after(_END)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    )


def _derived_leaf_builder(ca_cert: x509.Certificate, public_key, name: str, ips: list[str], serial: int,
                          usages: list) -> x509.CertificateBuilder:
    """A certificate for ``name`` and ``ips`` issued by ``ca_cert``, valid from _EPOCH to _END (unsigned)."""
    sans: list[x509.GeneralName] = [x509.DNSName(name)] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(public_key)
        .serial_number(serial).not_valid_before(_EPOCH).not_valid_after(_END)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )


def derived_ca(ca_key_pem: str, name: str) -> str:
    """The self-signed CA certificate (PEM) of ``ca_key_pem``, identical on every call."""
    key = _ed25519(ca_key_pem)
    cert = _derived_ca_builder(key, name, _serial(b"ca", name)).sign(key, None)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def derived_leaf(ca_key_pem: str, ca_name: str, name: str, ips: list[str]) -> tuple[str, str]:
    """(key PEM, certificate PEM) for member ``name``: server and client use, identical on every call."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives.asymmetric import ed25519

    ca_key = _ed25519(ca_key_pem)
    seed = hmac.new(ca_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption()), name.encode(), hashlib.sha256).digest()
    key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    ca_cert = x509.load_pem_x509_certificate(derived_ca(ca_key_pem, ca_name).encode())
    cert = _derived_leaf_builder(ca_cert, key.public_key(), name, ips, _serial(b"leaf", name),
                                 [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]).sign(ca_key, None)
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return pem_key, cert.public_bytes(serialization.Encoding.PEM).decode()


# --- PostgreSQL's server certificates: ECDSA P-256, derived from one key per cluster -----------------
# Channel binding (SCRAM-SHA-256-PLUS, tls-server-end-point) hashes the server certificate with
# the hash of its signature algorithm, which an Ed25519 signature does not have: PostgreSQL then
# offers no channel binding. So these are ECDSA with SHA-256, signed deterministically (RFC 6979):
# like the pgBackRest set above, the CA and every member's certificate are pure functions of the
# cluster's secret (``postgres_tls_ca_key_<cluster>``, a P-256 key) and the member's name.

def new_p256_key() -> str:
    """A new ECDSA P-256 private key, PKCS#8 PEM."""
    return _pem_key(ec.generate_private_key(ec.SECP256R1()))


def _p256(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 private key (make one with "
                         "`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)")
    return key


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def pg_ca(ca_key_pem: str, name: str) -> str:
    """The cluster's CA certificate (PEM), identical on every call."""
    key = _p256(ca_key_pem)
    cert = (_derived_ca_builder(key, name, _serial(b"pg-ca", name))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256(), ecdsa_deterministic=True))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def pg_server(ca_key_pem: str, ca_name: str, name: str, ips: list[str]) -> tuple[str, str]:
    """(key PEM, certificate PEM) of PostgreSQL member ``name`` at ``ips``, identical on every call:
    its key is derived from the CA key and the name (HMAC-SHA256), its signature is RFC 6979's."""
    import hashlib
    import hmac

    ca_key = _p256(ca_key_pem)
    scalar = ca_key.private_numbers().private_value.to_bytes(32, "big")
    seed = int.from_bytes(hmac.new(scalar, b"pg-server:" + name.encode(), hashlib.sha256).digest(), "big")
    key = ec.derive_private_key(seed % (_P256_ORDER - 1) + 1, ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate(pg_ca(ca_key_pem, ca_name).encode())
    cert = (
        _derived_leaf_builder(ca_cert, key.public_key(), name, ips, _serial(b"pg-server", name),
                              [ExtendedKeyUsageOID.SERVER_AUTH])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM).decode()
