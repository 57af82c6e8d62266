"""One tunnel end: resolve the names once, open the sockets, and run the end the command
line asks for.

Every end is made of the same parts: relays (relay.py) that carry datagrams between a TCP
connection and a UDP socket, and a way to find the connections. A single tunnel (one port
pair, or two in RTP mode) is served (server.py) or connected (client.py); in flow mode
(flows.py) each UDP source, or each connection, is a relay of its own. Every socket opened
here is closed here.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass
from functools import partial

import trio

from .acceptance import Admission, open_listeners
from .allow import SourceFilter
from .client import Client
from .client import Server as ServerAddress
from .config import Config, Mode, Relay
from .counters import Counters
from .flows import ClientFlow, FlowClient, FlowServer, open_flow_client_socket
from .flowtable import Flow, FlowTable
from .relay import kernel_drops
from .server import Server
from .session import Session
from .sockets import WILDCARD, Resolved, SockAddr, is_multicast, open_udp, resolve, show
from .tls import Tls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ready:
    """What a started tunnel end reports: the real addresses, once they exist.

    Attributes:
        tcp: a server's listening addresses, or a client's connected peers, one list per relay.
        udp: where each relay receives its datagrams.
    """

    tcp: list[list[SockAddr]]
    udp: list[SockAddr]


@dataclass(frozen=True)
class _Plan:
    """One relay's addresses, resolved."""

    relay: Relay
    tcp: list[Resolved]
    udp: Resolved
    udp_bind: Resolved


async def run_tunnel(
    config: Config,
    counters: Counters,
    *,
    task_status: trio.TaskStatus[Ready] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one tunnel end until its TCP peer closes or, with ``config.persist`` or in flow
    mode, until cancelled.

    Reports ``Ready`` once a server listens or a client is connected (with ``persist``, or
    in flow mode, once a client's UDP socket is bound: it connects on its own). Owns every
    socket it opens, and closes them all when it returns or is cancelled. The UDP sockets
    and a server's listeners stay open from one tunnel to the next.

    Raises:
        ConfigError: a host name does not resolve.
        TunnelError: a socket cannot be set up (address in use, connection refused, ...), or
            the TCP connection breaks; with ``persist``, only the first kind.
    """
    tls = Tls(config.tls, config.mode, config.handshake_timeout) if config.tls else None
    plans = [await _resolve(relay, config) for relay in config.relays]
    sources = SourceFilter(config.allow_from)
    admission = Admission(tls, config.max_handshakes, config.handshake_timeout)
    if config.flows:
        try:
            await _run_flows(config, counters, plans[0], sources, tls, admission, task_status)
        finally:  # a flow-mode end runs until stopped: the whole story, once, at the end
            log.info("Closed. %s", counters.report())
        return
    with contextlib.ExitStack() as udp_stack:
        udps = [
            open_udp(
                udp_stack,
                plan.udp,
                plan.udp_bind,
                ttl=config.ttl,
                bind_was_given=plan.relay.udp_bind.host is not None,
                sources=sources,
            )
            for plan in plans
        ]
        for udp in udps:  # closed by udp_stack later: count its drops until then
            udp_stack.callback(counters.watch_overflow(partial(kernel_drops, udp.sock)))
        udp_addresses = [udp.sock.getsockname() for udp in udps]
        session = Session(
            udps,
            counters,
            max_delay=config.max_delay,
            idle_timeout=config.idle_timeout,
            persist=config.persist,
        )
        if config.mode is Mode.SERVER:
            server = Server(
                session,
                admission,
                keepalive=config.keepalive,
                connect_timeout=config.connect_timeout,
                persist=config.persist,
                connections=config.connections,
            )
            async with contextlib.AsyncExitStack() as stack:
                listener_sets = await open_listeners(
                    stack, [(plan.tcp, plan.relay.tcp) for plan in plans]
                )
                addresses = [[lst.socket.getsockname() for lst in ls] for ls in listener_sets]
                task_status.started(Ready(addresses, udp_addresses))
                try:
                    await server.serve(listener_sets)
                finally:
                    if config.persist:  # what came while no tunnel was up, too
                        log.info("Closed. %s", counters.report())
            return
        client = Client(
            session,
            [ServerAddress(plan.tcp, plan.relay.tcp, config.proxy) for plan in plans],
            tls,
            keepalive=config.keepalive,
            connect_timeout=config.connect_timeout,
            reconnect_max=config.reconnect_max,
            connections=config.connections,
        )
        if config.persist:
            task_status.started(Ready([[] for _ in plans], udp_addresses))
            try:
                await client.keep_connected()
            finally:  # what came while no tunnel was up, too
                log.info("Closed. %s", counters.report())
        else:
            async with trio.open_nursery() as nursery:
                connected = await nursery.start(client.run_once)
                task_status.started(Ready([[address] for address in connected], udp_addresses))


async def _run_flows(
    config: Config,
    counters: Counters,
    plan: _Plan,
    sources: SourceFilter,
    tls: Tls | None,
    admission: Admission,
    task_status: trio.TaskStatus[Ready],
) -> None:
    """Run a flow-mode end until cancelled: a server reports its listening addresses (and
    no UDP address: each flow has its own), a client the address it receives on."""
    label = plan.relay.tcp
    if config.mode is Mode.SERVER:
        server = FlowServer(
            plan.udp,
            admission,
            FlowTable[Flow](config.max_flows, config.flow_timeout, counters),
            sources,
            keepalive=config.keepalive,
            max_delay=config.max_delay,
        )
        async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
            serve = partial(server.serve, stack, plan.tcp, label, reuse_port=config.reuse_port)
            addresses = await nursery.start(serve)
            task_status.started(Ready([addresses], []))
        return
    with contextlib.ExitStack() as stack:
        sock = open_flow_client_socket(stack, plan.udp_bind, counters)
        log.info("Receiving flows on UDP %s", show(sock.getsockname()))
        counters.state = "receiving flows"
        task_status.started(Ready([[]], [sock.getsockname()]))
        client = FlowClient(
            sock,
            ServerAddress(plan.tcp, label, config.proxy),
            tls,
            FlowTable[ClientFlow](config.max_flows, config.flow_timeout, counters),
            sources,
            keepalive=config.keepalive,
            connect_timeout=config.connect_timeout,
            max_delay=config.max_delay,
        )
        await client.run()


async def _resolve(relay: Relay, config: Config) -> _Plan:
    mode = config.mode
    udp = (await resolve(relay.udp, "UDP", socket.SOCK_DGRAM))[0]
    if relay.udp_bind.host is None:  # as the original: the group itself, or every address
        family, target = udp
        there = is_multicast(target) or (config.flows and mode is Mode.CLIENT)  # flows: UDP-ADDR
        host = target[0] if there else WILDCARD[family]
        udp_bind = (family, (host, relay.udp_bind.port))
    else:
        udp_bind = (await resolve(relay.udp_bind, "UDP bind", socket.SOCK_DGRAM))[0]
    if mode is Mode.CLIENT and config.proxy is not None and config.proxy.resolves_names:
        tcp: list[Resolved] = []  # the proxy resolves the name: this end may not know it
    else:
        tcp = await resolve(relay.tcp, "TCP", socket.SOCK_STREAM, passive=mode is Mode.SERVER)
    return _Plan(relay, tcp, udp, udp_bind)
