"""The pure parsers: every address form the original took, and the new ones."""

from __future__ import annotations

import pytest

from udptunnel.allow import SourceFilter
from udptunnel.config import (
    Address,
    Mode,
    Relay,
    build_config,
    parse_rule,
    parse_udp,
    split_address,
)
from udptunnel.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "host", "fields"),
    [
        ("127.0.0.1/5000", "127.0.0.1", ["5000"]),
        ("127.0.0.1:5000", "127.0.0.1", ["5000"]),
        ("239.1.2.3/5000/16", "239.1.2.3", ["5000", "16"]),
        ("239.1.2.3:5000:16", "239.1.2.3", ["5000", "16"]),
        ("example.org/5000", "example.org", ["5000"]),
        ("example.org", "example.org", []),
        ("::1/5000", "::1", ["5000"]),
        ("[::1]:5000", "::1", ["5000"]),
        ("[::1]/5000/3", "::1", ["5000", "3"]),
        ("[ff15::1]:5000:3", "ff15::1", ["5000", "3"]),
        ("::1", "::1", []),
        ("fe80::1%lo/5000", "fe80::1%lo", ["5000"]),
    ],
)
def test_address_forms(text: str, host: str, fields: list[str]) -> None:
    assert split_address(text) == (host, fields)


def test_udp_ttl_defaults_to_one() -> None:
    assert parse_udp("239.1.2.3/5000") == (Address("239.1.2.3", 5000), 1)
    assert parse_udp("239.1.2.3/5000/0") == (Address("239.1.2.3", 5000), 0)


def test_client_tcp_port_defaults_to_the_udp_port() -> None:
    config = build_config(server=None, client="example.org", udp="127.0.0.1/5000")
    assert config.mode is Mode.CLIENT
    assert config.tcp == Address("example.org", 5000)
    assert config.udp_bind == Address(None, 5000)


def test_server_listens_everywhere_unless_given_an_address() -> None:
    assert build_config(server="6000", client=None, udp="h/5").tcp == Address(None, 6000)
    assert build_config(server="::1/6000", client=None, udp="h/5").tcp == Address("::1", 6000)


def test_udp_bind_takes_an_address_a_port_or_both() -> None:
    def bind(text: str) -> Address:
        return build_config(server="6000", client=None, udp="h/5000", udp_bind=text).udp_bind

    assert bind("127.0.0.2") == Address("127.0.0.2", 5000)
    assert bind("5001") == Address(None, 5001)
    assert bind("[::1]:5001") == Address("::1", 5001)


def test_rtp_mode_relays_two_consecutive_port_pairs() -> None:
    config = build_config(server=None, client="h/6000", udp="g/5000", udp_bind="b/7000", rtp=True)
    assert config.relays == (
        Relay(Address("h", 6000), Address("g", 5000), Address("b", 7000)),
        Relay(Address("h", 6001), Address("g", 5001), Address("b", 7001)),
    )


@pytest.mark.parametrize("udp_bind", ["b/7001", None])
def test_rtp_mode_checks_every_port_even_the_defaulted_ones(udp_bind: str | None) -> None:
    with pytest.raises(ConfigError, match="must be even"):
        build_config(server=None, client="h", udp="g/5001", udp_bind=udp_bind, rtp=True)


@pytest.mark.parametrize(
    ("text", "network", "port"),
    [
        ("192.0.2.7", "192.0.2.7/32", None),
        ("192.0.2.7:5000", "192.0.2.7/32", 5000),
        ("192.0.2.7/32", "192.0.2.7/32", None),
        ("10.0.0.0/8", "10.0.0.0/8", None),
        ("10.0.0.0/8:53", "10.0.0.0/8", 53),
        ("0.0.0.0/0", "0.0.0.0/0", None),
        ("::1", "::1/128", None),
        ("[::1]", "::1/128", None),
        ("[::1]:53", "::1/128", 53),
        ("2001:db8::/32", "2001:db8::/32", None),
        ("[2001:db8::/32]:443", "2001:db8::/32", 443),
    ],
)
def test_allow_from_rules(text: str, network: str, port: int | None) -> None:
    rule = parse_rule(text)
    assert (str(rule.network), rule.port) == (network, port)
    assert parse_rule(str(rule)) == rule  # shown as it is written


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # "/" is always a prefix length: the original's ADDR/PORT says what to write instead
        (
            "10.0.0.0/33",
            "'10.0.0.0/33': prefix length 33 is over 32; for port 33, write 10.0.0.0:33",
        ),
        ("192.0.2.7/5000", "prefix length 5000 is over 32; for port 5000, write 192.0.2.7:5000"),
        ("::1/129", "prefix length 129 is over 128; for port 129, write [::1]:129"),
        ("[2001:db8::/200]:5", "prefix length 200 is over 128"),
        (
            "192.0.2.7/24",
            "192.0.2.7 is not the first address of a /24 network (that is 192.0.2.0/24); "
            "for port 24, write 192.0.2.7:24",
        ),
        ("::1/53", "(that is ::/53); for port 53, write [::1]:53"),
        ("10.0.0.0/8/53", "'10.0.0.0/8/53': a port follows a colon: 10.0.0.0/8:53"),
        ("2001:db8::/32/443", "a port follows a colon: [2001:db8::/32]:443"),
        ("10.0.0.0/x", "invalid prefix length 'x' (expected 0-32)"),
        ("host.example", "'host.example': not an IP address or network (a rule takes no host"),
        ("[::1", "missing ']'"),
        ("[::1]53", "expected ':PORT' after ']'"),
        ("192.0.2.7:", "missing port after ':'"),
        ("192.0.2.7:0x35", "'0x35': invalid port number"),
    ],
)
def test_allow_from_rules_that_are_wrong_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_rule(text)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_source_filter_matches_networks_ports_and_mapped_ipv4() -> None:
    rules = [parse_rule("127.0.0.1:5000"), parse_rule("10.0.0.0/8"), parse_rule("2001:db8::/32")]
    allows = SourceFilter(rules).allows
    assert allows(("127.0.0.1", 5000)) and not allows(("127.0.0.1", 5001))
    assert allows(("10.200.0.1", 9)) and allows(("::ffff:10.1.2.3", 9))
    assert allows(("2001:db8::1", 1)) and not allows(("2001:db9::1", 1))
    assert not allows(("::ffff:11.0.0.1", 9)) and not allows(("::1", 5000))
    assert not SourceFilter([])  # no rules: nothing to check, everyone allowed
