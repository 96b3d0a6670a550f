"""A test certificate authority and the certificates it signs, made in the test (with
``cryptography``): an upstream's TLS port whose certificate an agent trusts the way an
operator makes it trust a private CA (SSL_CERT_FILE naming the CA's certificate), or one
it must refuse: another CA's, an expired one, one for another host."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_DAY = datetime.timedelta(days=1)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class TestCA:
    """A CA: ``cert_file`` is what a client trusts; ``issue`` writes a server's chain."""

    __test__ = False   # not a test class, whatever pytest makes of its name
    directory: Path
    name: str = "Outpost Test CA"

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name(self.name)).issuer_name(_name(self.name))
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cert_file = self.directory / f"{self.name.replace(' ', '-')}.pem"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, host: str = "127.0.0.1", *, expired: bool = False) -> Path:
        """A server's key and certificate (for ``host``: an IP address or a DNS name), signed
        by this CA, in one PEM file as ``load_cert_chain`` takes it."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - 10 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alt = x509.DNSName(host)
        cert = (
            x509.CertificateBuilder().subject_name(_name(host)).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        path = self.directory / f"{host}{'-expired' if expired else ''}-{cert.serial_number}.pem"
        path.write_bytes(_pem(key) + cert.public_bytes(serialization.Encoding.PEM))
        return path


def server_context(chain: Path) -> ssl.SSLContext:
    """A server's TLS context serving ``chain``; ``serve(context, other)`` changes what the
    next handshakes get, as a server whose certificate is replaced."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serve(tls, chain)
    return tls


def serve(tls: ssl.SSLContext, chain: Path) -> None:
    tls.load_cert_chain(chain)
