"""The proxy_protocol settings: which listeners expect a PROXY header, checked at start against the listeners
and trusted_proxies."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, load
from proxy.settings import HostPort


def _load(**flags: str) -> object:
    return load(config_file=None, environ={}, flags=flags)


class TestProxyProtocolSettings:
    """Listeners named as in listen / tls_listen, or *; never without trusted_proxies."""

    @pytest.mark.parametrize(
        ("value", "plain", "tls"),
        [("*", True, True), (":8080", True, False), ("127.0.0.1:8443", False, True), ("", False, False)],
        ids=["every-listener", "plain-by-port", "tls-only", "off"],
    )
    def test_which_listeners(self, value: str, plain: bool, tls: bool) -> None:
        settings = load(config_file=None, environ={"FERRYMAN_TLS_CERTS": "x.pem"}, flags={
            "proxy_protocol": value, "trusted_proxies": "10.0.0.0/8", "tls_listen": "127.0.0.1:8443"})
        listeners = settings.listeners
        assert listeners.expects_proxy_header(listeners.plain) is plain
        assert listeners.expects_proxy_header(HostPort("127.0.0.1", 8443)) is tls

    @pytest.mark.parametrize(
        ("flags", "message"),
        [({"proxy_protocol": "*"}, "flag --proxy-protocol: key 'proxy_protocol': a PROXY header is believed only "
          "from trusted_proxies"),
         ({"proxy_protocol": "127.0.0.1:9", "trusted_proxies": "10.0.0.1"},
          "key 'proxy_protocol': 127.0.0.1:9 is not a listener"),
         ({"proxy_protocol": "nonsense", "trusted_proxies": "10.0.0.1"}, "key 'proxy_protocol': 'nonsense' is not"),
         ({"proxy_protocol_timeout": "0"}, "key 'proxy_protocol_timeout': must be between")],
        ids=["needs-trusted-proxies", "not-a-listener", "not-an-address", "timeout-zero"],
    )
    def test_errors_name_the_key(self, flags: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            _load(**flags)

    @pytest.mark.parametrize(
        ("value", "tcp", "sni"),
        [("*", True, True), ("127.0.0.1:6379", True, False), ("127.0.0.1:9443", False, True)],
        ids=["every-listener", "tcp-listener", "sni-listener"],
    )
    def test_tcp_and_sni_listeners_may_expect_a_header(self, value: str, tcp: bool, sni: bool) -> None:
        """TCP and SNI listeners are named as they are written in tcp_listen and sni_listen."""
        listeners = load(config_file=None, environ={}, flags={
            "proxy_protocol": value, "trusted_proxies": "10.0.0.0/8", "tcp_listen": "127.0.0.1:6379",
            "sni_listen": "127.0.0.1:9443"}).listeners
        assert listeners.expects_proxy_header(HostPort("127.0.0.1", 6379)) is tcp
        assert listeners.expects_proxy_header(HostPort("127.0.0.1", 9443)) is sni


class TestTlsPassthroughSettings:
    """tls_passthrough names TLS listeners (as in tls_listen) or *; nothing else."""

    @pytest.mark.parametrize(
        ("value", "first", "second"),
        [("*", True, True), ("127.0.0.1:8443", True, False), ("", False, False)],
        ids=["every-tls-listener", "one", "off"],
    )
    def test_which_listeners(self, value: str, first: bool, second: bool) -> None:
        listeners = load(config_file=None, environ={"FERRYMAN_TLS_CERTS": "x.pem"}, flags={
            "tls_passthrough": value, "tls_listen": "127.0.0.1:8443,127.0.0.1:9443"}).listeners
        assert listeners.passes_through(HostPort("127.0.0.1", 8443)) is first
        assert listeners.passes_through(HostPort("127.0.0.1", 9443)) is second

    @pytest.mark.parametrize(
        ("flags", "message"),
        [({"tls_passthrough": "*"}, "key 'tls_passthrough': \\* is not a TLS listener \\(tls_listen: none\\)"),
         ({"tls_passthrough": ":8080", "tls_listen": "127.0.0.1:8443", "tls_certs": "x.pem"},
          "key 'tls_passthrough': 0.0.0.0:8080 is not a TLS listener"),
         ({"tls_passthrough": "nonsense"}, "key 'tls_passthrough': 'nonsense' is not")],
        ids=["no-tls-listener", "the-plain-listener", "not-an-address"],
    )
    def test_errors_name_the_key(self, flags: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            _load(**flags)
