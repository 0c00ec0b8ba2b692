"""The ports ``nephrotrack run`` needs, checked before anything starts (contract, "Runtime (v2)").

A port is tried by binding it as its server will (same address, ``SO_REUSEADDR`` as uvicorn,
asyncio and nats-server set it), all of them at once so that two needs given one port are
caught too. A taken port the user chose, or an HTTP/MLLP port of the contract, stops the run
with the port and the variable that moves it: a stack on other ports than the ones asked for
would be found by nobody. Only the embedded NATS's default port may move, since ``run``
records and prints where it went (a laptop or this machine often runs a NATS on 4222 already).
"""

from __future__ import annotations

import errno
import socket
from contextlib import ExitStack
from dataclasses import dataclass


@dataclass(frozen=True)
class PortNeed:
    """One port to open: ``label`` says what for, ``variable`` moves it (and names it among the
    claimed ports); ``movable`` when any free port will do instead (the embedded NATS's default);
    port 0 for any free port from the start (``nephrotrack cluster``'s second replicas, its
    other nodes and routes)."""

    label: str
    host: str
    port: int
    variable: str
    movable: bool = False


class PortsUnavailable(SystemExit):
    """The ports cannot be had; the message names each port and the variable that moves it."""


@dataclass(frozen=True)
class Claimed:
    """The port each need got (by variable), and a sentence for each one that moved."""

    ports: dict[str, int]
    moved: list[str]


def claim_ports(needs: list[PortNeed], *, prefer: dict[str, int] | None = None,
                command: str = "nephrotrack run") -> Claimed:
    """Check every need; a movable one that is taken gets ``prefer[variable]`` when that is free
    (the port it had last time), else one the system picks. Raises :class:`PortsUnavailable`."""
    prefer = prefer or {}
    _refuse_duplicates(needs, command)
    ports: dict[str, int] = {}
    moved: list[str] = []
    refusals: list[str] = []
    with ExitStack() as held:  # every port stays bound until all are checked
        to_move = []
        for need in needs:
            try:
                sock = held.enter_context(_bound(need.host, need.port))
            except OSError as error:
                if need.movable and error.errno == errno.EADDRINUSE:
                    to_move.append(need)
                else:
                    refusals.append(_refusal(need, error))
                continue
            ports[need.variable] = sock.getsockname()[1]
        if refusals:
            raise PortsUnavailable(f"{command} cannot start:\n  " + "\n  ".join(refusals))
        for need in to_move:
            sock = held.enter_context(_free_port(need.host, prefer.get(need.variable)))
            ports[need.variable] = sock.getsockname()[1]
            moved.append(
                f"port {need.port} ({need.label}) is taken, by another server this run did not start; "
                f"using port {ports[need.variable]} instead (set {need.variable} to choose it)"
            )
    return Claimed(ports, moved)


def _refuse_duplicates(needs: list[PortNeed], command: str) -> None:
    seen: dict[int, PortNeed] = {}
    for need in needs:
        if need.port == 0:  # any free port: the system gives each its own
            continue
        other = seen.setdefault(need.port, need)
        if other is not need:
            raise PortsUnavailable(
                f"{command} cannot start: port {need.port} is set for both {other.label} ({other.variable}) "
                f"and {need.label} ({need.variable}); give one of them another port"
            )


def _refusal(need: PortNeed, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"port {need.port} ({need.label}) is taken: set {need.variable} to a free port"
    return (f"port {need.port} ({need.label}) cannot be opened on {need.host}: {error.strerror or error}: "
            f"set {need.variable} to another port (or NEPHROTRACK_HOST to an address of this machine)")


def _bound(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _free_port(host: str, preferred: int | None) -> socket.socket:
    if preferred:
        try:
            return _bound(host, preferred)
        except OSError:
            pass
    return _bound(host, 0)
