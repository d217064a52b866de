"""Source-address access rules: Fabio's per-route `allow=` / `deny=` and the global `allow` / `deny` settings.

A rule set holds networks parsed once (when the table or the settings are built). A request is checked
against the client's address, which is the TCP peer's, or, when the peer is one of `trusted_proxies`, the
right-most address of its X-Forwarded-For chain that is not a trusted proxy: a client that is not a trusted
proxy cannot name another address by sending the header (Fabio checks every X-Forwarded-For entry whoever sent
it; see the README's "Coming from Fabio"). An address that does not parse is refused by an allow list and not
matched by a deny list. Pure: values in, a verdict out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from .headers import X_FORWARDED_FOR, Headers, TrustedProxies

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_MEMO_SIZE: Final = 4096


class AccessRules:
    """Networks a client must be in (`allow`, when given) and must not be in (`deny`)."""

    __slots__ = ("_memo", "allow", "deny")

    def __init__(self, allow: Iterable[IPNetwork] = (), deny: Iterable[IPNetwork] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self._memo: dict[bytes, bool] = {}  # address -> permitted; bounded, cleared when full

    @classmethod
    def from_option(cls, access: tuple[str, tuple[str, ...]] | None) -> AccessRules | None:
        """The rules of a route tag's `allow=` or `deny=` (discovery.model.RouteOptions.access)."""
        if access is None:
            return None
        kind, texts = access
        networks = [ipaddress.ip_network(text) for text in texts]  # checked by the tag parser
        return cls(allow=networks) if kind == "allow" else cls(deny=networks)

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccessRules) and (self.allow, self.deny) == (other.allow, other.deny)

    def __hash__(self) -> int:
        return hash((self.allow, self.deny))

    def __repr__(self) -> str:
        return f"AccessRules(allow={[str(n) for n in self.allow]}, deny={[str(n) for n in self.deny]})"

    def permits(self, address: bytes) -> bool:
        known = self._memo.get(address)
        if known is None:
            known = self._decide(address)
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[address] = known
        return known

    def _decide(self, address: bytes) -> bool:
        try:
            ip = ipaddress.ip_address(address.decode("latin-1").strip().strip("[]"))
        except ValueError:
            return not self.allow  # an unreadable address is in no allowed network
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 from a dual-stack socket is 10.1.2.3
        if any(ip in network for network in self.deny):
            return False
        return not self.allow or any(ip in network for network in self.allow)


def client_address(peer: bytes, trusted: TrustedProxies | None, headers: Headers) -> bytes:
    """The address access rules judge: the peer's, or, from a trusted proxy, the right-most untrusted entry of
    the X-Forwarded-For chain (`trusted` is given only when the peer is one of trusted_proxies)."""
    if trusted is None:
        return peer
    chain = [value for name, value in headers if name.lower() == X_FORWARDED_FOR]
    return trusted.real_ip(chain, peer) if chain else peer
