"""A peer that vanishes without a word: two hosts in network namespaces, and the link between
them cut under a running tunnel."""

from __future__ import annotations

import time

import pytest

from .conftest import UDPTUNNEL, Process
from .netns import Network

KEEPALIVE = 3  # seconds: the promise is an end within about twice this
SLACK = 1.5  # seconds for the processes and the timers around the kernel's own
SERVER, CLIENT = "198.18.5.1", "198.18.5.2"
TCP_PORT = 6000


@pytest.mark.root
def test_a_vanished_peer_ends_the_tunnel_within_twice_the_keepalive(
    spawn: type[Process],
) -> None:
    with Network() as network:
        server_host, client_host = network.namespace("kaSrv"), network.namespace("kaCli")
        server_if, _ = network.link(server_host, client_host, [SERVER + "/24"], [CLIENT + "/24"])
        udp = ["--udp-bind", "127.0.0.1/5000", "127.0.0.1/5002"]  # each host's own loopback
        server = spawn([UDPTUNNEL, "-v", "-s", str(TCP_PORT), *udp], prefix=server_host.prefix)
        server.wait_for("Listening for TCP connections")
        client = spawn(
            [UDPTUNNEL, "-v", "--keepalive", str(KEEPALIVE), "-c", f"{SERVER}/{TCP_PORT}", *udp],
            prefix=client_host.prefix,
        )
        client.wait_for("Connected TCP to")
        server.wait_for("TCP connection from")
        server_host.ip("link", "set", server_if, "down")  # no FIN, no RST: silence
        cut = time.monotonic()
        assert client.wait(timeout=2 * KEEPALIVE + SLACK) == 1
        assert time.monotonic() - cut < 2 * KEEPALIVE + SLACK
        assert (
            client.lines[-1]
            == "udptunnel: TCP connection lost while receiving: Connection timed out"
        )
        server.kill()
