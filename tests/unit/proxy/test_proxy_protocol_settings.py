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
