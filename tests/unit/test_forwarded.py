"""The client of a request behind trusted proxies: the list of proxies as an operator writes it,
and X-Forwarded-For as proxies and attackers write it."""

from __future__ import annotations

import pytest

from order_viewer.adapters.http.forwarded import (
    MAX_HOPS,
    MAX_TRUSTED_PROXIES,
    TrustedProxies,
    limiter_key,
    trusted_networks,
)
from order_viewer.config import ConfigurationError, load_settings

PROXIES = TrustedProxies(trusted_networks("10.0.0.0/8, 2001:db8:ffff::/48"))
PROXY = "10.0.0.2"


def client(forwarded: list[str], peer: str = PROXY) -> str:
    return PROXIES.client(peer, [(b"x-forwarded-for", value.encode()) for value in forwarded])


@pytest.mark.parametrize(
    ("text", "networks"),
    [
        ("", []),
        ("   ", []),
        ("10.0.0.0/8", ["10.0.0.0/8"]),
        (" 10.0.0.0/8 ,  192.168.1.7 ", ["10.0.0.0/8", "192.168.1.7/32"]),
        ("fd00::/8,::1", ["fd00::/8", "::1/128"]),
    ],
)
def test_a_list_of_proxies_is_addresses_and_networks(text: str, networks: list[str]) -> None:
    assert [str(network) for network in trusted_networks(text)] == networks


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0.0.0.0/0", "'0.0.0.0/0' trusts every address: any client could name its own"),
        ("10.0.0.0/8,::/0", "'::/0' trusts every address"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set"),
        ("fd00::1/8", "'fd00::1/8' has host bits set"),
        ("proxy.internal", "'proxy.internal' is not a CIDR network"),
        ("10.0.0.0/33", "'10.0.0.0/33' is not a CIDR network"),
        ("10.0.0.0/-1", "'10.0.0.0/-1' is not a CIDR network"),
        ("10.0.0.0/8;11.0.0.0/8", "'10.0.0.0/8;11.0.0.0/8' is not a CIDR network"),
        ("10.0.0.0/8,", "an empty entry"),
        ("10.0.0.0/8,,11.0.0.0/8", "an empty entry"),
        ("::ffff:10.0.0.0/104", "is IPv4-mapped: write it as the IPv4 network"),
        (",".join(["10.0.0.1"] * (MAX_TRUSTED_PROXIES + 1)), "101 entries, at most 100"),
        ("x" * 100_000, "'" + "x" * 60 + "' is not a CIDR network"),
        ("10.0.0.0/8\n11.0.0.0/8", "is not a CIDR network"),
    ],
)
def test_a_bad_list_of_proxies_stops_start_up_with_one_line_naming_the_entry(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("HTTP_TRUSTED_PROXIES", value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    text = str(refused.value)
    assert text.startswith("invalid setting HTTP_TRUSTED_PROXIES: ")
    assert message in text
    assert "\n" not in text
    assert len(text) < 200


def test_the_whole_list_is_allowed_at_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    many = ",".join(f"10.0.{n}.0/24" for n in range(MAX_TRUSTED_PROXIES))
    monkeypatch.setenv("HTTP_TRUSTED_PROXIES", many)
    assert len(load_settings().http_trusted_proxies) == MAX_TRUSTED_PROXIES


@pytest.mark.parametrize(
    ("forwarded", "expected"),
    [
        ([], PROXY),  # nothing forwarded: the proxy itself (a health check of its own)
        (["203.0.113.9"], "203.0.113.9"),
        (["203.0.113.9, 10.0.0.1"], "203.0.113.9"),  # through two proxies
        # Spoofed hops left of the one the proxy appended are never looked at.
        (["10.0.0.1, 198.51.100.1, 203.0.113.9"], "203.0.113.9"),
        (["1.1.1.1, evil\r\nstatus=200, 203.0.113.9"], "203.0.113.9"),
        (["10.0.0.7, 10.0.0.1"], "10.0.0.7"),  # all trusted: the left-most
        # Repeated headers are one list, in their order.
        (["198.51.100.1", "203.0.113.9"], "203.0.113.9"),
        (["203.0.113.9", "10.0.0.1"], "203.0.113.9"),
        # Ports, brackets, IPv6 forms.
        (["203.0.113.9:4711"], "203.0.113.9"),
        (["[2001:db8::7]:4711"], "2001:db8::7"),
        (["[2001:db8::7]"], "2001:db8::7"),
        (["2001:db8::7"], "2001:db8::7"),
        (["2001:DB8:0:0:0:0:0:7"], "2001:db8::7"),
        (["fe80::1%eth0"], "fe80::1"),  # the zone id is the sender's text: dropped
        (["fe80::1%ev il\nstatus=200"], "fe80::1"),
        (["::ffff:203.0.113.9"], "203.0.113.9"),
        (["[::ffff:203.0.113.9]:80"], "203.0.113.9"),
        (["203.0.113.9, ::ffff:10.0.0.1"], "203.0.113.9"),  # a proxy IPv4-mapped is trusted
        (["203.0.113.9, 2001:db8:ffff::1"], "203.0.113.9"),
    ],
)
def test_the_client_is_the_right_most_hop_that_is_not_a_trusted_proxy(
    forwarded: list[str], expected: str
) -> None:
    assert client(forwarded) == expected


@pytest.mark.parametrize(
    "hop",
    [
        "",
        " ",
        "unknown",
        "_hidden",
        "203.0.113.9:port",
        "203.0.113.9:",
        "203.0.113.9:²",
        "[2001:db8::7",
        "[2001:db8::7]x",
        "[2001:db8::7]:",
        "203.0.113.256",
        "0x7f.1",
        "1" * 10_000,
        "203.0.113.9\x00",
        "203.0.113.9\u00a0",
    ],
)
def test_a_hop_that_is_not_an_address_leaves_the_proxy_that_forwarded_it_as_the_client(
    hop: str,
) -> None:
    """A sender that could get a hop of its choice written there would otherwise choose a new
    count of failures at will."""
    assert client([hop]) == PROXY
    assert client([f"203.0.113.9, {hop}"]) == PROXY
    assert client([f"203.0.113.9, {hop}, 10.0.0.1"]) == "10.0.0.1"
    assert client([f"{hop}, 203.0.113.9"]) == "203.0.113.9"


def test_hundreds_of_hops_are_not_all_looked_at() -> None:
    spoofed = ", ".join(["10.0.0.9"] * 500)
    assert client([f"{spoofed}, 203.0.113.9"]) == "203.0.113.9"
    # All trusted: the left-most of those looked at, never one the sender put further left.
    hops = [f"10.1.{n // 256}.{n % 256}" for n in range(500)]
    assert client([", ".join(["203.0.113.9", *hops])]) == hops[-MAX_HOPS]
    assert client([f"{'x' * 60_000}, 203.0.113.9"]) == "203.0.113.9"
    assert client([f"203.0.113.9,{'x' * 60_000}"]) == PROXY


@pytest.mark.parametrize("peer", ["203.0.113.9", "10.0.0.2x", "-", "2001:db8::1", ""])
def test_a_peer_that_is_not_a_trusted_proxy_is_the_client_whatever_it_forwards(
    peer: str,
) -> None:
    assert client(["198.51.100.1"], peer) == peer


@pytest.mark.parametrize(
    ("client_address", "key"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("-", "-"),
        ("not:an:address", "not:an:address"),
    ],
)
def test_the_limiter_counts_an_ipv6_client_by_its_64(client_address: str, key: str) -> None:
    assert limiter_key(client_address) == key
