"""The one best-effort reader of an HL7 message's MSH segment, with plain string operations only
(no parser that could fail): for what must work on a message that cannot be parsed — the charset
it declares (decoding), the header an ACK answers, the delimiters a refused message's PID-3 is
read with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIRST_SEGMENT = re.compile(r"[\r\n]")
_FRAMING = "\x0b\r\n\t "


@dataclass(frozen=True)
class Msh:
    """The MSH segment's fields as written: ``field(n)`` is MSH-n (n ≥ 2; MSH-1 is the separator)."""

    separator: str
    fields: tuple[str, ...]

    def field(self, number: int) -> str:
        return self.fields[number - 1] if 2 <= number <= len(self.fields) else ""

    @property
    def component(self) -> str:
        """The component separator MSH-2 declares (HL7's ``^`` when it declares none)."""
        return (self.field(2) + "^")[0]

    @property
    def repetition(self) -> str:
        """The repetition separator MSH-2 declares (HL7's ``~`` when it declares none)."""
        encoding = self.field(2)
        return encoding[1] if len(encoding) > 1 else "~"

    def components(self, number: int, limit: int = 3) -> tuple[str, ...]:
        """MSH-n's first ``limit`` components, stripped (``()`` when the field is empty)."""
        value = self.field(number)
        return tuple(part.strip() for part in value.split(self.component)[:limit]) if value else ()

    def first(self, number: int) -> str:
        parts = self.components(number)
        return parts[0] if parts else ""


def sniff_msh(message: str | bytes) -> Msh | None:
    """The MSH segment at the start of ``message`` (MLLP framing and blank lines before it are
    skipped), or ``None`` when it does not start with one. Bytes are read as Latin-1, which keeps
    every ASCII character — all an MSH field labs reads is made of — where it was."""
    text = message.decode("latin-1") if isinstance(message, bytes) else message
    first = _FIRST_SEGMENT.split(text.lstrip(_FRAMING), maxsplit=1)[0]
    if not first.startswith("MSH") or len(first) < 4:
        return None
    return Msh(first[3], tuple(first.split(first[3])))
