"""The client of a request behind reverse proxies: the address the failure limiter counts and
the audit line names, told from `X-Forwarded-For` only where the peer is a trusted proxy.

Each proxy appends the address it received the request from, so the right end of the header is
written by the proxies in front of the service and the left end by whoever sent the request
first: the client is the right-most hop that is not a trusted proxy. Everything left of it may
be made up by the client, and is never looked at.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

# A list longer than this is a mistake (cloud load balancers publish a few dozen ranges), and
# every request from a proxy is checked against each network of it.
MAX_TRUSTED_PROXIES = 100
# Hops looked at from the right: more proxies than this in a row is no real deployment, and the
# header's length is the sender's to choose.
MAX_HOPS = 32
# The longest hop that can be an address: a bracketed IPv6 address with a port.
_MAX_HOP_LENGTH = len("[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535")
# Hops read recently, with what they are: the same proxies and clients come again and again,
# and reading one with `ipaddress` and checking it against the networks costs more than the
# rest of a cache hit (docs/PERFORMANCE.md). Bounded in entries and, by the length above, in
# bytes.
_HOPS_REMEMBERED = 4096


def trusted_networks(text: str) -> tuple[Network, ...]:
    """The networks of a comma-separated list of addresses and CIDR networks; empty for a blank
    text. Raises ValueError naming the entry at fault."""
    if not text.strip():
        return ()
    entries = [entry.strip() for entry in text.split(",")]
    if len(entries) > MAX_TRUSTED_PROXIES:
        raise ValueError(f"{len(entries)} entries, at most {MAX_TRUSTED_PROXIES}")
    return tuple(_network(entry) for entry in entries)


def _network(entry: str) -> Network:
    if not entry:
        raise ValueError("an empty entry (two commas in a row, or one at an end)")
    try:
        network = ip_network(entry)
    except ValueError as error:
        reason = "has host bits set" if "host bits set" in str(error) else "is not a CIDR network"
        raise ValueError(f"{entry[:60]!r} {reason}") from None
    if network.prefixlen == 0:
        raise ValueError(f"{entry!r} trusts every address: any client could name its own")
    if isinstance(network, IPv6Network) and network.network_address.ipv4_mapped is not None:
        # Addresses are compared as IPv4 when they are IPv4-mapped, so this could match nothing.
        raise ValueError(f"{entry!r} is IPv4-mapped: write it as the IPv4 network")
    return network


class TrustedProxies:
    """Tells the client of a request from its peer and the `X-Forwarded-For` headers."""

    def __init__(self, networks: Iterable[Network]) -> None:
        self._networks = tuple(networks)
        self._remembered = lru_cache(maxsize=_HOPS_REMEMBERED)(self._read_anew)

    def client(self, peer: str, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The client's address: the peer's own unless it is a trusted proxy; then the right-most
        hop that is not one (all trusted: the left-most looked at). A hop that is not an address
        ends the search at the trusted proxy that forwarded it, which is then the client: a
        sender that can get a hop of its choice written there (a proxy passing the header on
        without appending) would otherwise pick a new address, and a new count, at will."""
        client, trusted = self._read(peer)
        if client is None or not trusted:
            return peer
        # Repeated headers are one list, in the order they came (RFC 9110, 5.3).
        forwarded = b",".join(value for name, value in headers if name == b"x-forwarded-for")
        if not forwarded:
            return peer
        for hop in reversed(forwarded.decode("latin-1").rsplit(",", MAX_HOPS)[-MAX_HOPS:]):
            address, trusted = self._read(hop.strip())
            if address is None:
                break
            client = address
            if not trusted:
                break
        return client

    def _read(self, hop: str) -> tuple[str | None, bool]:
        """The address of a hop as text (None: not an address), and whether it is a trusted
        proxy's."""
        return self._remembered(hop) if len(hop) <= _MAX_HOP_LENGTH else (None, False)

    def _read_anew(self, hop: str) -> tuple[str | None, bool]:
        address = _address(hop)
        if address is None:
            return None, False
        return str(address), any(address in network for network in self._networks)


def _address(hop: str) -> Address | None:
    """The address of a hop as proxies write it (`192.0.2.7`, `192.0.2.7:4711`, `2001:db8::7`,
    `[2001:db8::7]:4711`), IPv4-mapped IPv6 as IPv4, without a zone id (`%eth0`: meaningless
    beyond its link, and text of the sender's); None for anything else."""
    if len(hop) > _MAX_HOP_LENGTH:
        return None
    port: str | None = None
    if hop.startswith("["):
        hop, bracket, rest = hop[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif hop.count(":") == 1:  # IPv4 with a port; IPv6 has two colons at least
        hop, port = hop.split(":")
    if port is not None and not (port.isascii() and port.isdigit()):
        return None
    try:
        address = ip_address(hop.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def limiter_key(client: str) -> str:
    """The key the failure limiter counts a client under: an IPv6 address by its /64 (a host is
    usually given a whole /64, and picks a new address in it at will), IPv4-mapped as IPv4,
    anything else as it is."""
    if ":" not in client:  # IPv4, the cheap test first: this runs on every guarded request
        return client
    return _ipv6_key(client)


@lru_cache(maxsize=_HOPS_REMEMBERED)
def _ipv6_key(client: str) -> str:
    # Remembered as hops are: a /64 network made anew on every request costs more than a hit.
    address = _address(client)
    if address is None:
        return client
    if isinstance(address, IPv4Address):
        return str(address)
    return str(IPv6Network((address, 64), strict=False))
