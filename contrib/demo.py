"""``make demo``: a real tunnel on loopback, with datagrams crossing it both ways.

Two applications, A and B, talk UDP through a udptunnel server and client on this host:

    app A 127.0.0.1:A  <-UDP->  udptunnel -s  <==TCP==>  udptunnel -c  <-UDP->  app B 127.0.0.1:B

Each end receives on its own --udp-bind port, so all four share the host. The tunnel's own
log (-v) is shown as it happens, prefixed with [server] or [client].
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

UDPTUNNEL = str(Path(sys.executable).parent / "udptunnel")
HOST = "127.0.0.1"
TIMEOUT = 5.0  # seconds to wait for anything before the demo gives up


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        tcp.bind((HOST, 0))
        port = tcp.getsockname()[1]
        udp.bind((HOST, port))
        return port


def app(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, port))
    sock.settimeout(TIMEOUT)
    return sock


class Tunnel:
    """A udptunnel process whose log is echoed with a prefix; ``wait_for`` a line of it."""

    def __init__(self, name: str, *args: str) -> None:
        print(f"$ udptunnel {' '.join(args)}")
        self.name = name
        self.proc = subprocess.Popen(
            [UDPTUNNEL, *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
        )
        self.seen: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._echo, daemon=True).start()

    def _echo(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            print(f"  [{self.name}] {line.rstrip()}", flush=True)
            with self.changed:
                self.seen.append(line)
                self.changed.notify_all()

    def wait_for(self, text: str) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: any(text in s for s in self.seen), TIMEOUT):
                sys.exit(f"demo: the {self.name} never said {text!r}")


def main() -> None:
    tcp, a, a_in, b, b_in = (free_port() for _ in range(5))
    app_a, app_b = app(a), app(b)
    print(f"app A listens on {HOST}:{a}; app B listens on {HOST}:{b}\n")
    server = Tunnel("server", "-v", "-s", str(tcp), "--udp-bind", f"{HOST}/{a_in}", f"{HOST}/{a}")
    server.wait_for("Listening for TCP connections")
    client = Tunnel(
        "client", "-v", "-c", f"{HOST}/{tcp}", "--udp-bind", f"{HOST}/{b_in}", f"{HOST}/{b}"
    )
    client.wait_for("Connected TCP")
    server.wait_for("TCP connection from")
    print()
    for n in range(1, 4):
        message = f"hello A, this is B ({n})".encode()
        app_b.sendto(message, (HOST, b_in))
        print(f"app B sent     {message!r} to the client end, {HOST}:{b_in}")
        print(f"app A received {app_a.recv(65536)!r}")
        reply = f"hello B, A here ({n})".encode()
        app_a.sendto(reply, (HOST, a_in))
        print(f"app A sent     {reply!r} to the server end, {HOST}:{a_in}")
        print(f"app B received {app_b.recv(65536)!r}\n")
    big = bytes(range(256)) * 200
    app_b.sendto(big, (HOST, b_in))
    assert app_a.recv(65536) == big
    print(f"a {len(big)}-byte datagram crossed intact; an empty one next:")
    app_b.sendto(b"", (HOST, b_in))
    print(f"app A received {app_a.recv(65536)!r}\n")
    print("Stopping the client with SIGTERM; the server follows it out:")
    client.proc.terminate()
    statuses = client.proc.wait(TIMEOUT), server.proc.wait(TIMEOUT)
    print(f"\nexit status: client {statuses[0]}, server {statuses[1]}")
    app_a.close()
    app_b.close()
    sys.exit(max(statuses))


if __name__ == "__main__":
    main()
