"""Container health check for a nephrotrack service: GET a probe on the service's own HTTP port.

    python /opt/nephrotrack/healthcheck.py [PATH_OR_URL]      (default: /healthz)

A full URL (``http://127.0.0.1:8004/readyz``) is requested as given. A bare path is requested
from 127.0.0.1 on the port of the service this container runs: the service is found in the
process table (``python -m services.<name>``), its port from ``NEPHROTRACK_<NAME>_PORT`` or the
contract default. Exit status 0 on HTTP 200, 1 otherwise, as Docker expects. Standard library
only: the slim image has no curl, and a health check must not depend on the application importing.

``/readyz`` needs the operator role: the probe sends ``Authorization: Bearer`` with
``NEPHROTRACK_OPERATOR_KEY`` when set, else with the first operator key of ``NEPHROTRACK_API_KEYS``
(the container's own configuration); ``/healthz`` is open and ignores it.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

DEFAULT_PORTS = {"outcomes": 8000, "enrollment": 8001, "pulse": 8002, "cells": 8003, "labs": 8004}
_SERVICE_MODULE = re.compile(r"^services\.(?P<name>[a-z]+)(?:\.__main__)?$")


def detect_service(proc: Path = Path("/proc")) -> str | None:
    """The nephrotrack service some process in this container runs, from its command line."""
    found: set[str] = set()
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        for arg in argv:
            match = _SERVICE_MODULE.match(arg.decode(errors="replace"))
            if match and match["name"] in DEFAULT_PORTS:
                found.add(match["name"])
    return found.pop() if len(found) == 1 else None


def service_port(service: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> int:
    raw = environ.get(f"NEPHROTRACK_{service.upper()}_PORT", "")
    return int(raw) if raw.strip() else DEFAULT_PORTS[service]


def probe_url(target: str, proc: Path = Path("/proc")) -> str:
    if "://" in target:
        return target
    service = detect_service(proc)
    if service is None:
        raise SystemExit(f"healthcheck: no single nephrotrack service process found; pass a full URL instead of {target!r}")
    return f"http://127.0.0.1:{service_port(service)}{target}"


def operator_key(environ: dict[str, str] | os._Environ[str] = os.environ) -> str | None:
    """The key to probe with: NEPHROTRACK_OPERATOR_KEY, else NEPHROTRACK_API_KEYS' first operator key."""
    explicit = environ.get("NEPHROTRACK_OPERATOR_KEY", "").strip()
    if explicit:
        return explicit
    for entry in environ.get("NEPHROTRACK_API_KEYS", "").split(","):
        role, _, key = entry.strip().partition(":")
        if role.strip().lower() == "operator" and key.strip():
            return key.strip()
    return None


def check(url: str, timeout: float = 4.0, key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - local probe
            return response.status == 200
    except urllib.error.HTTPError as exc:  # 503 from /readyz lands here
        print(f"healthcheck: {url} answered {exc.code}: {exc.read(500).decode(errors='replace')}", file=sys.stderr)
        return False
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url} unreachable: {exc}", file=sys.stderr)
        return False


def main(argv: list[str]) -> int:
    target = argv[1] if len(argv) > 1 else "/healthz"
    return 0 if check(probe_url(target), key=operator_key()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
