"""TLS termination: certificates from files and from Consul KV, chosen per connection by SNI, swapped in
without dropping a connection.

Each certificate serves the DNS names of its subjectAltName (its common name when it has none): exact names
first, then `*.suffix` wildcards matching one label, as browsers match them (RFC 6125 §6.4.3). A client whose
server name matches nothing, or that sends none, gets the default: the first file certificate, else the first
KV certificate by name. The listener's context only dispatches: its SNI callback hands each handshake the
context of the certificate it picked from the current `CertStore`, an immutable value replaced whole on
reload, so a handshake never sees half a reload and established connections are untouched.

Parsing names out of certificates is done with `cryptography` (the standard library reads certificates only
of a connected peer). Pure but for reading files; the watching lives in the app.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from discovery.static import file_stamp

# Forward secrecy and AEAD only for TLS 1.2 (Mozilla's "intermediate" profile); TLS 1.3 suites are OpenSSL's.
CIPHERS_TLS12: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class TlsError(Exception):
    """A certificate that cannot be used; `origin` is where it came from (a file, a KV key)."""

    def __init__(self, origin: str, detail: str) -> None:
        super().__init__(f"{origin}: {detail}")
        self.origin = origin
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CertFile:
    """One `tls_certs` entry: a certificate file and its key file (the same file when the PEM holds both)."""

    cert: str
    key: str

    @classmethod
    def parse_list(cls, text: str) -> tuple[CertFile, ...]:
        """`cert.pem:key.pem,both.pem` -> entries; ValueError naming a bad item."""
        out = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                if text.strip():
                    raise ValueError(f"tls_certs {text!r}: empty item")
                continue
            cert, _, key = item.partition(":")
            if not cert:
                raise ValueError(f"tls_certs item {item!r}: no certificate file")
            out.append(cls(cert, key or cert))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Certificate:
    origin: str  # where it came from, for messages: a file path or "consul kv <prefix><name>"
    names: tuple[str, ...]
    context: ssl.SSLContext


# ALPN (RFC 7301): h2 offered first, so a client that speaks both gets HTTP/2 (RFC 9113 §3.2); http2 = false
# offers http/1.1 alone. A certificate's context replaces the listener's in the SNI callback, and OpenSSL then
# answers ALPN from the new one: every context carries the same list.
ALPN_H2: Final = ("h2", "http/1.1")
ALPN_H1: Final = ("http/1.1",)


def server_context(alpn: Sequence[str] = ALPN_H2) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def names_of(cert_pem: bytes, origin: str) -> tuple[str, ...]:
    """The DNS names a certificate serves, lower case: its SAN DNS names, else its common name."""
    # Imported here, not at the top: cryptography's x509 module costs 15 MiB of RSS in every process, and only
    # processes that serve TLS read certificates.
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TlsError(origin, f"not a PEM certificate: {exc}") from exc
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names))


def load_files(entry: CertFile, alpn: Sequence[str] = ALPN_H2) -> Certificate:
    """A certificate and key from files; TlsError naming the file that is wrong."""
    try:
        cert_pem = Path(entry.cert).read_bytes()
    except OSError as exc:
        raise TlsError(entry.cert, f"cannot read certificate: {exc.strerror or exc}") from exc
    names = names_of(cert_pem, entry.cert)
    ctx = server_context(alpn)
    try:
        ctx.load_cert_chain(entry.cert, entry.key)
    except FileNotFoundError as exc:
        raise TlsError(str(exc.filename or entry.key), "no such file") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(entry.key, f"key does not load with certificate {entry.cert}: {exc}") from exc
    return Certificate(entry.cert, names, ctx)


def load_pem(cert_pem: bytes, key_pem: bytes, origin: str, alpn: Sequence[str] = ALPN_H2) -> Certificate:
    """A certificate and key given as PEM text (from Consul KV); load_cert_chain reads files, so they pass
    through a private temporary directory that is removed at once."""
    names = names_of(cert_pem, origin)
    ctx = server_context(alpn)
    with tempfile.TemporaryDirectory(prefix="ferryman-tls-") as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(origin, str(exc)) from exc
    return Certificate(origin, names, ctx)


class CertStore:
    """Certificates by name; immutable once built."""

    def __init__(self, certificates: Sequence[Certificate]) -> None:
        self.certificates = tuple(certificates)
        self.default = self.certificates[0].context if self.certificates else None
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}
        for cert in self.certificates:  # the first certificate naming a name keeps it
            for name in cert.names:
                if name.startswith("*."):
                    self._wildcard.setdefault(name[2:], cert.context)
                else:
                    self._exact.setdefault(name, cert.context)

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self._exact.get(name)
            if ctx is not None:
                return ctx
            _, dot, parent = name.partition(".")
            if dot:
                ctx = self._wildcard.get(parent)
                if ctx is not None:
                    return ctx
        return self.default

    @property
    def names(self) -> list[str]:
        return [name for cert in self.certificates for name in cert.names]


class Terminator:
    """The listeners' TLS context and the certificates behind it."""

    def __init__(self, files: Sequence[CertFile], alpn: Sequence[str] = ALPN_H2) -> None:
        self.files = tuple(files)
        self.alpn = tuple(alpn)
        self._from_files: tuple[Certificate, ...] = ()
        self._from_kv: tuple[Certificate, ...] = ()
        self.store = CertStore(())
        self._stamps: dict[str, tuple[int, int, int] | None] = {}
        self.context = server_context(alpn)
        self.context.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        ctx = self.store.select(server_name)
        if ctx is not None:
            sslobj.context = ctx
        return None

    def load_files(self) -> None:
        """(Re)read every certificate file; TlsError (naming the file) leaves the current ones in place. The
        files' stamps are taken either way, so a file that does not load is reported once per change."""
        self._stamps = self._file_stamps()
        self._from_files = tuple(load_files(entry, self.alpn) for entry in self.files)
        self._rebuild()

    def set_kv(self, certificates: Iterable[Certificate]) -> None:
        self._from_kv = tuple(certificates)
        self._rebuild()

    def files_changed(self) -> bool:
        return self._file_stamps() != self._stamps

    def _file_stamps(self) -> dict[str, tuple[int, int, int] | None]:
        return {path: file_stamp(path) for entry in self.files for path in (entry.cert, entry.key)}

    def _rebuild(self) -> None:
        self.store = CertStore((*self._from_files, *self._from_kv))


def kv_certificates(
    prefix: str, values: dict[str, bytes], previous: Mapping[str, Certificate] | None = None,
    alpn: Sequence[str] = ALPN_H2,
) -> tuple[dict[str, Certificate], list[str]]:
    """Certificates from a KV prefix holding `<name>/cert` and `<name>/key`, by name; and the problems (a
    name with one half missing, a pair that does not load), each naming its keys.

    A pair is served only when its certificate and key load together (OpenSSL checks that the key is the
    certificate's). A rotation writes the two keys one after the other, so between the two writes the new
    certificate sits beside the old key (or the other way round): until the halves match again the name keeps
    the pair it had (`previous`), rather than leaving its clients to the default certificate."""
    pairs: dict[str, dict[str, bytes]] = {}
    for key, value in values.items():
        rest = key[len(prefix):] if key.startswith(prefix) else key
        name, slash, part = rest.rpartition("/")
        if slash and part in ("cert", "key") and name:
            pairs.setdefault(name, {})[part] = value
    out: dict[str, Certificate] = {}
    problems: list[str] = []
    for name in sorted(pairs):
        pair = pairs[name]
        origin = f"consul kv {prefix}{name}"
        kept = previous.get(name) if previous else None
        keeping = "; the pair loaded before stays in use" if kept is not None else ""
        if "cert" not in pair or "key" not in pair:
            missing = "cert" if "cert" not in pair else "key"
            problems.append(f"{origin}: no {prefix}{name}/{missing}{keeping}")
        else:
            try:
                out[name] = load_pem(pair["cert"], pair["key"], origin, alpn)
                continue
            except TlsError as exc:
                problems.append(f"{exc}{keeping}")
        if kept is not None:
            out[name] = kept
    return out, problems


class HttpsRedirect:
    """Which plain-HTTP requests are sent to HTTPS: every host (`*`) or the listed ones (exact names and
    `*.suffix` wildcards). 301 for GET and HEAD, 308 for the rest (the method and body are kept)."""

    __slots__ = ("_all", "_exact", "_port", "_suffixes")

    def __init__(self, names: Sequence[str], port: int) -> None:
        """`names`: the `https_redirect` setting, parsed (lower case, checked)."""
        self._all = "*" in names
        self._exact = frozenset(n for n in names if not n.startswith("*."))
        self._suffixes = tuple(n[1:] for n in names if n.startswith("*."))  # ".example.com"
        self._port = b"" if port == 443 else b":%d" % port

    def location(self, host: str, target: bytes) -> bytes | None:
        """The Location for a request to `host` (lower case, no port), or None when it is not redirected."""
        if not host:
            return None
        if self._all or host in self._exact or (self._suffixes and host.endswith(self._suffixes)):
            return b"https://" + host.encode("latin-1") + self._port + target
        return None
