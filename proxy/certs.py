"""The TLS listeners' certificates over time: files re-read when they change (and on SIGHUP), and certificates
held in Consul KV under `tls_kv_prefix`, handed over by a KV follower (discovery/kv.py).

Loading and choosing certificates is tls.py's; this module decides when. A renewal that writes new files is
picked up within `tls_reload_interval`; new handshakes get the new certificate, open connections keep theirs. A
file or a KV entry that does not load is logged and the certificates loaded before stay in use; a KV pair whose
certificate and key do not match (half-way through a rotation's two writes) keeps the pair it had.
"""

from __future__ import annotations

import asyncio
import ssl

import structlog

from .tls import ALPN_H1, ALPN_H2, CertFile, Certificate, Terminator, TlsError, kv_certificates

log = structlog.get_logger("ferryman")


class Certificates:
    """The certificates behind the TLS listeners' context. `load()` at start raises TlsError (naming the file),
    for the app to report as a config error."""

    def __init__(self, tls_certs: tuple[CertFile, ...], reload_interval: float, *, http2: bool = True) -> None:
        self.terminator = Terminator(tls_certs, ALPN_H2 if http2 else ALPN_H1)
        self.interval = reload_interval
        self._kv: dict[str, Certificate] = {}  # what Consul KV serves now, by name

    @property
    def context(self) -> ssl.SSLContext:
        return self.terminator.context

    @property
    def has_files(self) -> bool:
        return bool(self.terminator.files)

    def load(self) -> None:
        """Read the certificate files before anything starts: TlsError when one does not load."""
        self.terminator.load_files()
        if self.terminator.files:
            log.info("tls_certs_loaded", source="files", names=self.terminator.store.names)

    def reload(self, tls_certs: tuple[CertFile, ...], reload_interval: float) -> None:
        """SIGHUP: the files named now, read now."""
        self.terminator.files = tls_certs
        self.interval = reload_interval
        self._reload_files("sighup")

    def _reload_files(self, reason: str) -> None:
        try:
            self.terminator.load_files()
        except TlsError as exc:
            log.error("tls_reload_failed", file=exc.origin, error=exc.detail, reason=reason,
                      detail="the certificates loaded before stay in use")
            return
        log.info("tls_certs_loaded", source="files", names=self.terminator.store.names, reason=reason)

    async def watch_files(self) -> None:
        """Re-read the certificate files when they change (a renewal writes new files), until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            if self.terminator.files_changed():
                self._reload_files("files changed")

    def kv_changed(self, prefix: str, values: dict[str, bytes]) -> None:
        """Certificates under a Consul KV prefix (`<name>/cert`, `<name>/key`), so every Ferryman of a cluster
        serves the same ones without files."""
        self._kv, problems = kv_certificates(prefix, values, self._kv, self.terminator.alpn)
        for problem in problems:
            log.warning("tls_kv_certificate_invalid", error=problem)
        self.terminator.set_kv(self._kv.values())
        log.info("tls_certs_loaded", source="consul kv", prefix=prefix, names=self.terminator.store.names)
