"""HL7 v2 ORU^R01 over MLLP: the labs service's TCP listener (python-hl7's asyncio MLLP server).

One message per MLLP frame (``<VT> message <FS><CR>``), answered with one ACK frame, in order,
on the same connection. For each message:

1. ``decode_hl7_bytes`` then ``parse_oru``. A message that cannot be taken at all (not HL7, not
   ORU^R01, no PID, no OBX, …) is refused: ``LabResultRejected`` recorded, ACK ``AR``.
2. Its results go through the ingestion core in ONE transaction, with a ``LabResultRejected``
   for each refused OBX. Only after that transaction committed is the ACK sent (durability: an
   ``AA`` means the results are in the store), ``AA`` when every OBX was accepted (a duplicate
   or a result parked for a not-yet-enrolled subject counts as accepted), else ``AE`` with the
   reasons in MSA-3 and one ERR segment per refused OBX.
3. If the store cannot be written (database down), the answer is ``AR`` "resend later"
   (``storage_unavailable``), and nothing is recorded: the lab's resend has the effect, once.
   The same for a concurrent writer that kept changing a result's record through every retry
   of the command runner (``store.transact``): ``AR`` ``concurrent_update``, resend later.

Defences (garbage must never take the listener down): a frame may hold at most
:data:`MAX_FRAME_BYTES`; a longer one is discarded up to its end block and refused
(``message_too_large``); bytes that are not an MLLP frame are refused (``not_mllp``); a frame
cut by the peer closing is refused (``incomplete_frame``); a message must arrive within the
read timeout once started (``read_timeout``, then the connection is closed); an idle connection
is closed after the idle timeout, counted from the end of the last frame (blank lines between
frames do not restart it, so a trickle of them cannot hold a connection); at most
``max_connections`` connections at once and ``max_connections_per_address`` from one peer address
(one client cannot lock the labs out). Every error is caught at the connection boundary: the
connection is closed, the server goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass

import structlog
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server

from services.labs.handlers import IngestResults, IngestRunner
from services.labs.hl7_acks import build_ack
from services.labs.hl7_charsets import decode_hl7_bytes
from services.labs.hl7_messages import (
    MAX_MESSAGE_CHARS,
    Hl7MessageError,
    ParsedOru,
    parse_oru,
)
from services.labs.ingest import Refusal
from services.labs.inputs import LabRejection
from shared.errors import Conflict
from shared.tasks import within

log = structlog.get_logger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\r"
MAX_FRAME_BYTES = MAX_MESSAGE_CHARS
"""1 MiB: a lab result message is a few kB."""
MAX_DISCARD_BYTES = 64 * MAX_FRAME_BYTES
"""An oversized frame is read and thrown away up to its end block (so the peer gets its AR and
the connection stays in step); beyond this much the connection is closed instead."""
_REPORT_BYTES = 8192
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class FrameProblem:
    """Bytes that did not make an MLLP frame: refused with ``code``; ``keep_open`` when the
    stream is still in step (the bad frame was consumed up to its end block)."""

    reason: str
    code: str
    data: bytes
    keep_open: bool


class MllpServer:
    """``ingest`` runs a message's results and refusals in one transaction
    (:func:`services.labs.handlers.ingest_runner`)."""

    def __init__(
        self,
        ingest: IngestRunner,
        *,
        host: str,
        port: int,
        idle_timeout: float = 60.0,
        read_timeout: float = 30.0,
        max_connections: int = 100,
        max_connections_per_address: int = 10,
    ) -> None:
        self.ingest = ingest
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_connections_per_address = max_connections_per_address
        self.active = 0
        self.active_by_address: Counter[str] = Counter()
        self.server: asyncio.AbstractServer | None = None

    async def run(self) -> None:
        """Serve until cancelled (a Service background task)."""
        self.server = await start_hl7_server(self._connection, self.host, self.port, limit=MAX_FRAME_BYTES + 2)
        log.info("MLLP listening", host=self.host, port=self.port)
        try:
            async with self.server:
                await self.server.serve_forever()
        finally:
            self.server = None

    # ------------------------------------------------------------------ connections

    async def _connection(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer, address = str(peername), str(peername[0] if peername else "")
        if self.active >= self.max_connections:
            log.warning("MLLP connection refused: too many connections", peer=peer, active=self.active)
            writer.transport.abort()
            return
        if self.active_by_address[address] >= self.max_connections_per_address:
            log.warning("MLLP connection refused: too many connections from its address", peer=peer,
                        active=self.active_by_address[address])
            writer.transport.abort()
            return
        self.active += 1
        self.active_by_address[address] += 1
        try:
            while True:
                frame = await self._read_frame(reader)
                if frame is None:
                    break
                if isinstance(frame, FrameProblem):
                    ack = await self._refuse_frame(frame)
                else:
                    ack = await self.handle_message(frame)
                writer.writeblock(ack.encode("ascii", errors="replace"))
                await within(self.read_timeout, writer.drain())
                if isinstance(frame, FrameProblem) and not frame.keep_open:
                    break
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as error:
            log.info("MLLP connection ended", peer=peer, error=repr(error))
        except Exception as error:  # noqa: BLE001 - the connection boundary: never take the server down
            log.exception("MLLP connection failed", peer=peer, error=repr(error))
        finally:
            self.active -= 1
            self.active_by_address[address] -= 1
            if not self.active_by_address[address]:
                del self.active_by_address[address]
            writer.close()
            with contextlib.suppress(Exception):
                await within(5, writer.wait_closed())

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes | FrameProblem | None:
        """The next frame's message bytes, a :class:`FrameProblem`, or ``None`` when the peer
        closed or stayed idle between messages (close quietly: nothing was sent)."""
        try:
            async with asyncio.timeout(self.idle_timeout):  # one deadline: a trickle of blanks never resets it
                first = await reader.readexactly(1)
                while first in _WHITESPACE:  # blank lines between frames are tolerated
                    first = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            return None
        try:
            async with asyncio.timeout(self.read_timeout):
                rest = await self._read_until_end(reader)
        except TimeoutError:
            return FrameProblem(
                f"incomplete MLLP frame: no end block <FS><CR> within {self.read_timeout:g} s",
                "read_timeout", first, keep_open=False,
            )
        except asyncio.IncompleteReadError as error:
            return FrameProblem(
                "incomplete MLLP frame: the connection closed before the end block <FS><CR>",
                "incomplete_frame", first + error.partial[:_REPORT_BYTES], keep_open=False,
            )
        if isinstance(rest, FrameProblem):
            return FrameProblem(rest.reason, rest.code, first + rest.data, rest.keep_open)
        block = first + rest[: -len(END_BLOCK)]
        if block.startswith(START_BLOCK):
            return block[1:]
        start = block.find(START_BLOCK)
        if start < 0:
            return FrameProblem(
                "not an MLLP frame: no start block <VT> (0x0b) before the end block <FS><CR>",
                "not_mllp", block, keep_open=True,
            )
        log.warning("MLLP bytes before the start block ignored", ignored=len(block[:start].strip(_WHITESPACE)))
        return block[start + 1 :]

    async def _read_until_end(self, reader: asyncio.StreamReader) -> bytes | FrameProblem:
        try:
            return await reader.readuntil(END_BLOCK)
        except asyncio.LimitOverrunError as overrun:
            kept = bytearray()
            discarded = 0
            consumed = overrun.consumed
            while True:
                chunk = await reader.readexactly(max(consumed, 1))
                discarded += len(chunk)
                if len(kept) < _REPORT_BYTES:
                    kept += chunk[: _REPORT_BYTES - len(kept)]
                if discarded > MAX_DISCARD_BYTES:
                    return FrameProblem(
                        f"MLLP frame larger than {MAX_FRAME_BYTES} bytes (more than {MAX_DISCARD_BYTES} "
                        "read without an end block); connection closed",
                        "message_too_large", bytes(kept), keep_open=False,
                    )
                try:
                    tail = await reader.readuntil(END_BLOCK)
                except asyncio.LimitOverrunError as again:
                    consumed = again.consumed
                    continue
                discarded += len(tail)
                return FrameProblem(
                    f"message is {discarded - len(END_BLOCK)} bytes; the limit is {MAX_FRAME_BYTES}",
                    "message_too_large", bytes(kept), keep_open=True,
                )

    # ------------------------------------------------------------------ messages

    async def _refuse_frame(self, problem: FrameProblem) -> str:
        refusal = Refusal.of_input(LabRejection(problem.reason, problem.code), "mllp", problem.data, _REPORT_BYTES)
        if (failed := await self._store_refusals([refusal], problem.data)) is not None:
            return failed
        return build_ack(problem.data, "AR", problem.reason, error_code=problem.code)

    async def handle_message(self, data: bytes) -> str:
        """Process one message; returns the ACK text (sent by the caller after this returned,
        i.e. after the transaction committed)."""
        text = decode_hl7_bytes(data)
        try:
            parsed = parse_oru(text)
        except Exception as error:  # noqa: BLE001 - a parser bug must still get an answer
            rejection = error if isinstance(error, Hl7MessageError) else _parser_failed(error)
            if (failed := await self._store_refusals([Refusal.of_input(rejection, "mllp", data)], text)) is not None:
                return failed
            return build_ack(text, "AR", rejection.reason, error_code=rejection.code)
        results = parsed.results
        where: list[str | None] = [f"OBX {_position(parsed, result)}" for result in results]
        refusals = [Refusal(rejection, "mllp") for rejection in parsed.rejections()]
        try:
            outcomes = await self.ingest(IngestResults(results, refusals, where, actor="labs:mllp"))
        except Conflict as conflict:
            log.warning("MLLP message not stored: concurrent updates", control_id=parsed.control_id)
            return _conflict_ack(parsed, conflict)
        except Exception as error:  # noqa: BLE001 - database down: answer "resend later"
            log.error("MLLP message not stored", control_id=parsed.control_id, error=repr(error))
            return _storage_ack(parsed)
        errors = list(parsed.errors)
        for outcome, label in zip(outcomes, where, strict=True):
            if outcome.rejection is not None:
                reason = outcome.rejection.reason.removeprefix(f"{label}: ")  # the ACK locates it itself
                errors.append(parsed.error_for(outcome.result, LabRejection(reason, outcome.rejection.code)))
        if errors:
            return build_ack(parsed, "AE", errors=sorted(errors, key=lambda error: error.obx_index))
        return build_ack(parsed, "AA")

    async def _store_refusals(self, refusals: list[Refusal], source: str | bytes) -> str | None:
        """Record the refusal of a whole message (``source``); ``None`` when it was recorded,
        else the ACK to send instead."""
        try:
            await self.ingest(IngestResults([], refusals, actor="labs:mllp"))
        except Conflict as conflict:
            return _conflict_ack(source, conflict)
        except Exception as error:  # noqa: BLE001 - database down: answer "resend later"
            log.error("MLLP refusal not stored", error=repr(error))
            return _storage_ack(source)
        return None


def _parser_failed(error: Exception) -> LabRejection:
    log.exception("HL7 parser failed", error=repr(error))
    return LabRejection(f"message could not be parsed: {type(error).__name__}", "unparseable")


def _position(parsed: ParsedOru, result: object) -> int:
    return next(index for index, item in enumerate(parsed.items, 1) if item is result)


def _storage_ack(source: ParsedOru | str | bytes) -> str:
    return build_ack(
        source, "AR", "temporarily unable to store the message; resend it later", error_code="storage_unavailable"
    )


def _conflict_ack(source: ParsedOru | str | bytes | None, conflict: Conflict) -> str:
    return build_ack(source, "AR", f"{conflict.reason}; nothing was recorded, resend it later",
                     error_code="concurrent_update")
