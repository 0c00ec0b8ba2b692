"""Before the test suite: say clearly which server is missing instead of 200 confusing errors."""

from __future__ import annotations

import socket
import sys
from urllib.parse import urlparse

from tests.conftest import NATS_URL, POSTGRES


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def main() -> int:
    postgres = urlparse(POSTGRES.replace("+asyncpg", ""))
    nats = urlparse(NATS_URL)
    missing = [
        f"{name} at {host}:{port}"
        for name, host, port in (
            ("PostgreSQL", postgres.hostname or "127.0.0.1", postgres.port or 5432),
            ("NATS", nats.hostname or "127.0.0.1", nats.port or 4222),
        )
        if not reachable(host, port)
    ]
    if missing:
        print("The test suite needs real servers; not reachable: " + ", ".join(missing), file=sys.stderr)
        print("Start them (see README, 'Testing') or point NEPHROTRACK_TEST_POSTGRES / NEPHROTRACK_TEST_NATS elsewhere.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
