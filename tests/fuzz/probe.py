"""Synchronous access to a running labs service for hypothesis-driven fuzzers (hypothesis tests
are synchronous; they run in a worker thread with this probe): MLLP exchanges, HTTP posts, and
the state of the labs store that refused input must leave unchanged."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.stack import AUTH_HEADERS

STATE_SQL = text(
    "SELECT (SELECT count(*) FROM events WHERE stream_id NOT LIKE 'rejection-%') AS facts,"
    " (SELECT count(*) FROM parked_results) AS parked,"
    " (SELECT count(*) FROM lab_result_index) AS indexed,"
    " (SELECT count(*) FROM lab_rejections) AS rejections"
)


@dataclass(frozen=True)
class StoreState:
    facts: int  # events outside rejection streams: results, eGFRs, corrections, known patients' …
    parked: int
    indexed: int
    rejections: int

    def results(self) -> tuple[int, int, int]:
        """What refused input must not change."""
        return self.facts, self.parked, self.indexed


class LabsProbe:
    def __init__(self, labs_url: str, mllp_port: int, database_url: str) -> None:
        self.labs_url = labs_url
        self.mllp_port = mllp_port
        self.loop = asyncio.new_event_loop()
        self.engine = create_async_engine(database_url, pool_size=1)
        # A fresh connection per request: a kept-alive one may be closed by the server (its
        # keep-alive timeout) just as the next case is sent, a client-side race, not a finding.
        self.http = httpx.Client(headers=AUTH_HEADERS, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))

    def close(self) -> None:
        self.http.close()
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()

    def state(self) -> StoreState:
        async def read() -> StoreState:
            async with self.engine.connect() as connection:
                row = (await connection.execute(STATE_SQL)).one()
            return StoreState(row.facts, row.parked, row.indexed, row.rejections)

        return self.loop.run_until_complete(read())

    def mllp(self, payload: bytes, *, frame: bool = True, timeout: float = 30) -> bytes:
        return mllp_exchange(self.mllp_port, payload, frame=frame, timeout=timeout)

    def post(self, path: str, content: bytes, content_type: str = "application/fhir+json",
             headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.post(f"{self.labs_url}{path}", content=content,
                              headers={"Content-Type": content_type, **(headers or {})})

    def alive(self) -> bool:
        return httpx.get(f"{self.labs_url}/healthz", timeout=5).status_code == 200


def mllp_exchange(port: int, payload: bytes, *, frame: bool = True, timeout: float = 30, source: str = "") -> bytes:
    """Send one MLLP frame (or raw bytes), from the loopback address ``source`` when given (all of
    127/8 is the loopback on Linux); the first answer frame, or what came before close."""
    data = b"\x0b" + payload + b"\x1c\r" if frame else payload
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(data)
        if not frame:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while b"\x1c\r" not in received:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
    return received


def ack_fields(answer: bytes) -> dict[str, Any]:
    """MSA-1 (code), MSA-3 (text) and the ERR segments of an ACK frame."""
    text_ = answer.strip(b"\x0b\x1c\r").decode("utf-8", "replace")
    segments = [s for s in text_.replace("\n", "\r").split("\r") if s]
    msa = next((s for s in segments if s.startswith("MSA")), "")
    fields = msa.split(msa[3:4]) if len(msa) > 3 else []
    return {
        "code": fields[1] if len(fields) > 1 else None,
        "text": fields[3] if len(fields) > 3 else "",
        "errors": [s for s in segments if s.startswith("ERR")],
        "raw": text_,
    }
