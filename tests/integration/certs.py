"""Test certificates for the TLS integration tests: a throwaway CA, leaf certificates it signs, and helpers that
ask a TLS server which certificate it presents for a given SNI name (or for none).

Everything is generated with `cryptography` at test time: keys are EC P-256 (RSA 2048 on request), every
certificate is valid from an hour ago to a day from now, carries the names it is given as subjectAltName DNS
entries (the first also as its common name), and gets its own random serial, so a test tells two certificates for
the same names apart by their serials.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _new_key(kind: str) -> PrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r} (ec or rsa)")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes) -> Path:
    """Write a file whole: to a temporary name beside it, then renamed over it (a reader never sees half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Leaf:
    """One issued certificate: its PEM text, its key's PEM text, its serial and its names."""

    cert_pem: bytes
    key_pem: bytes
    serial: int
    names: tuple[str, ...]

    def write(self, cert_path: Path, key_path: Path | None = None) -> tuple[Path, Path | None]:
        """Write the certificate and its key as two files, or both into `cert_path` when `key_path` is None.
        The key goes first, so the pair on disk is mismatched for as short a time as two renames take."""
        if key_path is None:
            _write(cert_path, self.cert_pem + self.key_pem)
            return cert_path, None
        _write(key_path, self.key_pem)
        _write(cert_path, self.cert_pem)
        return cert_path, key_path


class TestCA:
    """A self-signed CA in `directory` (its certificate at `ca_path`) that issues leaf certificates."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, directory: Path, name: str = "Ferryman Test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = _new_key("ec")
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = _write(directory / "ca.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, *names: str, key: str = "ec") -> Leaf:
        """A server certificate for `names` (DNS subjectAltNames; the first is also the common name)."""
        if not names:
            raise ValueError("a leaf certificate needs at least one name")
        leaf_key = _new_key(key)
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return Leaf(cert.public_bytes(serialization.Encoding.PEM), _key_pem(leaf_key), serial, tuple(names))

    def issue_files(self, directory: Path, stem: str, *names: str, key: str = "ec",
                    combined: bool = False) -> tuple[Leaf, Path, Path]:
        """Issue a certificate and write it as `directory/<stem>.pem` and `directory/<stem>.key` (or both in
        `<stem>.pem` when `combined`); returns the leaf, the certificate path and the key path (the same path
        when combined)."""
        leaf = self.issue(*names, key=key)
        cert_path = directory / f"{stem}.pem"
        key_path = cert_path if combined else directory / f"{stem}.key"
        leaf.write(cert_path, None if combined else key_path)
        return leaf, cert_path, key_path

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA (and only it), with hostname checking on."""
        return ssl.create_default_context(cafile=str(self.ca_path))


# --- what a server presents ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Presented:
    """The certificate a server presented on one handshake, and the protocol version agreed."""

    serial: int
    names: tuple[str, ...]
    common_name: str
    version: str | None


def describe(der: bytes, version: str | None = None) -> Presented:
    cert = x509.load_der_x509_certificate(der)
    try:
        names = tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ()
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return Presented(cert.serial_number, names, str(cns[0].value) if cns else "", version)


def presented_cert(port: int, sni: str | None, ca_path: Path, *, host: str = "127.0.0.1",
                   timeout: float = 5) -> Presented:
    """Handshake with `host:port` sending `sni` as the server name (None: no SNI extension at all) and return the
    certificate the server chose. The chain is verified against `ca_path`; the name is not (a client asking for a
    name the server has no certificate for gets the default certificate, which is what the tests look at)."""
    context = ssl.create_default_context(cafile=str(ca_path))
    context.check_hostname = False  # the chain is still verified: verify_mode stays CERT_REQUIRED
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None, "the server presented no certificate"
        # The dict form is only filled in for a verified chain: a second proof the CA signed it.
        assert tls.getpeercert(), "the presented certificate was not verified against the test CA"
        return describe(der, tls.version())


def verified_handshake(port: int, sni: str, ca_path: Path, *, host: str = "127.0.0.1", timeout: float = 5) -> Presented:
    """Handshake as a strict client would: chain AND name verified (ssl.SSLCertVerificationError otherwise)."""
    context = ssl.create_default_context(cafile=str(ca_path))
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            context.wrap_socket(raw, server_hostname=sni) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return describe(der, tls.version())
