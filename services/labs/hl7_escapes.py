"""HL7 v2 escape sequences in the fields labs reads: the standard ones decoded, any other refused.

python-hl7's ``unescape`` drops what it does not know: ``1\\Z5`` (a sequence never closed) became
the value 1, ``IGA\\Z-A-001`` the subject ``IGA`` — another patient — and ``1\\Z\\5`` the value 15,
with the whole field text (a patient id, for PID-3) written to its log. So labs reads the raw
field and decodes it here, where a sequence it does not know is an error, never a deletion.

Standard (HL7 v2 chapter 2, "Use of escape sequences in text fields"): ``\\F\\`` ``\\S\\`` ``\\T\\``
``\\R\\`` ``\\E\\`` for the delimiters, ``\\Xhh…\\`` for bytes in hex, and ``\\H\\``/``\\N\\`` (start
and end of highlighting, a display hint dropped here) in text fields only. Character-set switches
(``\\C…\\``, ``\\M…\\``), formatting commands (``\\.br\\`` …), locally defined ``\\Z…\\`` sequences
and empty or unterminated ones are refused: none belongs in an id, a code, a number or a time.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"X(?:[0-9A-Fa-f]{2})+")


class EscapeError(ValueError):
    """A field holds an escape sequence labs does not decode; the message names it."""


def unescape(raw: str, separators: str, escape: str, *, text: bool = False) -> str:
    """``raw`` (a field component as sent) with its escape sequences decoded.

    ``separators`` are python-hl7's (segment, field, repetition, component, subcomponent), as
    ``hl7.Message.separators``; ``escape`` the escape character (MSH-2's third). ``text``: the
    field is free text, where highlighting is allowed. Raises :class:`EscapeError`.
    """
    if escape not in raw:
        return raw
    delimiters = {"F": separators[1], "R": separators[2], "S": separators[3], "T": separators[4], "E": escape}
    if text:
        delimiters |= {"H": "", "N": ""}
    parts = raw.split(escape)
    if len(parts) % 2 == 0:
        raise EscapeError(f"an escape sequence that is never closed (from {_shown(escape + parts[-1][:1])}...)")
    decoded = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            decoded.append(part)
        elif part in delimiters:
            decoded.append(delimiters[part])
        elif _HEX.fullmatch(part):
            decoded.append(_hex_text(part[1:]))
        else:
            raise EscapeError(f"the escape sequence {_shown(escape + part + escape)}, which is not a standard one "
                              "(only \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\Xhh..\\ and, in text, \\H\\ \\N\\)")
    return "".join(decoded)


def _hex_text(digits: str) -> str:
    """Escaped bytes as text: UTF-8 when they are, else Latin-1 (which decodes any byte) — the
    message's own charset is not known here, and the lenient order is decode_hl7_bytes's."""
    data = bytes.fromhex(digits)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _shown(sequence: str, limit: int = 16) -> str:
    """A sequence for a refusal reason: printable ASCII as is (the reason goes into ACKs), anything
    else ``?``, and short — it names the sequence without repeating the field around it."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in sequence)
    return text if len(text) <= limit else text[: limit - 3] + "..."
