"""Who may send datagrams into the tunnel: the ``--allow-from`` rules (config.Rule) at work.

Without rules every source is accepted, as the original did. With them, a datagram is
accepted only from an address inside one rule's network and, if the rule names a port, from
that port; everything else is dropped and counted. IPv4 sources seen by an IPv6 socket
(``::ffff:192.0.2.1``) match IPv4 rules.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from .config import Rule

_MAPPED = "::ffff:"


class SourceFilter:
    """Decides, per datagram, whether its source may send into the tunnel."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._seen: dict[tuple[str, int], bool] = {}  # sources already decided

    def __bool__(self) -> bool:
        """True if there is anything to check: no rules accept everyone."""
        return bool(self.rules)

    def allows(self, source: tuple[str, int]) -> bool:
        """Whether a datagram from ``source`` (host, port) is accepted."""
        decided = self._seen.get(source)
        if decided is None:
            decided = self._decide(source)
            if len(self._seen) >= MEMORY:
                self._seen.clear()  # a scan of many sources must not grow this without bound
            self._seen[source] = decided
        return decided

    def _decide(self, source: tuple[str, int]) -> bool:
        host, port = source
        host = host.partition("%")[0]
        if host.startswith(_MAPPED) and "." in host:
            host = host[len(_MAPPED) :]
        address = ipaddress.ip_address(host)
        return any(address in rule.network and rule.port in (None, port) for rule in self.rules)


MEMORY = 4096  # sources whose verdict is remembered: the lookups cost nothing after the first
