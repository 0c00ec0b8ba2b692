"""``<var>/runtime.json``: where the stack that ``nephrotrack run`` started listens.

``run`` writes it once its ports are claimed (they may differ from the defaults: the embedded
NATS moves off a taken 4222) and marks it stopped when it stops; ``demo``, ``rebuild`` and the
lab-system instructions read it, so a second shell finds the stack without repeating any
variable. A variable set explicitly still wins over the record. It holds no secrets: the NATS
URL is without password (the passwords are in ``nats-credentials.env`` and ``api-keys.env``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

RUNTIME_FILE = "runtime.json"


@dataclass(frozen=True)
class RunningStack:
    """What ``runtime.json`` records: the supervisor's pid, when it started (and stopped), each
    service's HTTP URL, the MLLP listener (``host:port``) and the broker (``nats_url``: one URL,
    or, for ``nephrotrack cluster``, every node's, comma-separated). ``replicas`` and
    ``mllp_replicas``: every replica's addresses, the first as in ``http`` and ``mllp`` (one for
    ``run``, two for ``nephrotrack cluster``; empty in a record from before them)."""

    pid: int
    started_at: str
    http: Mapping[str, str]
    mllp: str
    nats_url: str
    nats_embedded: bool
    stopped_at: str | None = None
    replicas: Mapping[str, Sequence[str]] = field(default_factory=dict)
    mllp_replicas: Sequence[str] = field(default_factory=list)

    @property
    def nats_ports(self) -> list[int]:
        """The port of each URL in ``nats_url`` (the embedded nodes')."""
        return [port for url in self.nats_url.split(",") if (port := urlsplit(url.strip()).port)]

    @property
    def nats_port(self) -> int | None:
        return next(iter(self.nats_ports), None)

    def is_running(self) -> bool:
        """Not marked stopped and its supervisor alive (a killed one leaves its record behind)."""
        return self.stopped_at is None and _alive(self.pid)


def client_host(host: str) -> str:
    """The address a client on this machine uses for a listener bound to ``host``."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def write(var: Path, stack: RunningStack) -> None:
    """Replace the record atomically: a reader never sees half of it."""
    path = var / RUNTIME_FILE
    temporary = path.with_name(f".{RUNTIME_FILE}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(stack), indent=2) + "\n")
    os.replace(temporary, path)


def mark_stopped(var: Path, pid: int) -> None:
    """Mark the record of supervisor ``pid`` stopped (kept: the next run may reuse its ports)."""
    stack = read(var)
    if stack is not None and stack.pid == pid and stack.stopped_at is None:
        write(var, RunningStack(**{**asdict(stack), "stopped_at": datetime.now(UTC).isoformat()}))


def read(var: Path) -> RunningStack | None:
    """The record, running or not; ``None`` when there is none (or it cannot be read)."""
    try:
        return RunningStack(**json.loads((var / RUNTIME_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def read_running(var: Path) -> RunningStack | None:
    """The record of a stack that is running now, else ``None``."""
    stack = read(var)
    return stack if stack is not None and stack.is_running() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
