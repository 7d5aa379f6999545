"""A self-signed certificate for ``distexec up --tls``, made with ``cryptography``.

The certificate is its own trust anchor: clients and slaves are given it as
their CA file (``cafile`` in the connection file), so they verify the master
exactly as they would verify a certificate from a real CA, with no
``verify=False`` anywhere.  It is kept under ``$DISTEXEC_HOME/tls`` and reused
while it is valid and covers the wanted names, so a restarted master keeps
the certificate its slaves already trust.
"""
from __future__ import annotations

import datetime as _dt
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import config

VALID_DAYS = 365
RENEW_BEFORE = _dt.timedelta(days=7)
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def tls_dir() -> str:
    return os.path.join(config.home(), "tls")


def _san(names) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def make_self_signed(certfile: str, keyfile: str, names=DEFAULT_NAMES, days: int = VALID_DAYS) -> None:
    """Write a new key (0600) and a self-signed server certificate for ``names`` (IPs and DNS names)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"distexec master ({names[0]})")])
    now = _dt.datetime.now(_dt.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        # A leaf, not a CA: trusting it lets a client trust this one server, nothing it might sign.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.dirname(os.path.abspath(keyfile)), mode=0o700, exist_ok=True)
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(certfile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _still_good(certfile: str, keyfile: str, names) -> bool:
    try:
        with open(certfile, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        if not os.path.exists(keyfile):
            return False
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < _dt.datetime.now(_dt.timezone.utc):
        return False
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return all(n in have for n in _san(names))


def ensure_self_signed(names=DEFAULT_NAMES, directory: str | None = None) -> tuple[str, str]:
    """``(certfile, keyfile)`` under ``$DISTEXEC_HOME/tls``, made if missing, expiring or not covering ``names``."""
    directory = directory or tls_dir()
    certfile = os.path.join(directory, "master-cert.pem")
    keyfile = os.path.join(directory, "master-key.pem")
    names = tuple(dict.fromkeys(names))  # keep order, drop repeats
    if not _still_good(certfile, keyfile, names):
        make_self_signed(certfile, keyfile, names)
    return certfile, keyfile
