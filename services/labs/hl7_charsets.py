"""The text of an HL7 v2 message from its bytes: the charset MSH-18 declares (HL7 table 0211), else
UTF-8, else Latin-1 — never an error (see :func:`decode_hl7_bytes`)."""

from __future__ import annotations

import re

from services.labs.hl7_msh import sniff_msh

_CHARSETS = {
    # HL7 table 0211 (MSH-18) values, plus spellings seen in the wild.
    "ASCII": "ascii", "ISO IR6": "ascii", "US-ASCII": "ascii",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "ISO IR100": "iso8859-1", "ISO-8859-1": "iso8859-1", "LATIN1": "iso8859-1",
    "UNICODE UTF-8": "utf-8", "UNICODE": "utf-8", "UTF-8": "utf-8", "UTF8": "utf-8", "ISO IR192": "utf-8",
    "WINDOWS-1252": "cp1252", "CP1252": "cp1252",
    "GB 18030-2000": "gb18030", "BIG-5": "big5", "KS X 1001": "euc_kr",
}


def decode_hl7_bytes(data: bytes) -> str:
    """Bytes of one HL7 message as text; never raises.

    Tries, in order, the charset MSH-18 declares (HL7 table 0211, e.g. ``8859/1``,
    ``UNICODE UTF-8``), then UTF-8, then Latin-1 (which decodes any byte). Why not refuse bytes
    that are invalid in the declared charset: labs routinely declare ASCII and send an accented
    name in an NTE; the fields we use (ids, codes, numbers, times) are ASCII in every charset
    we know, so a lenient decode loses nothing we read, and refusing would lose the result.
    The reverse mistake (Latin-1 declared, UTF-8 sent) cannot be detected and only garbles
    free text. UTF-16/32 are not supported: the ``MSH`` marker itself would not be readable.
    """
    declared = _CHARSETS.get(_declared_charset(data))
    for encoding in (declared, "utf-8"):
        if encoding is not None:
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                continue
    return data.decode("latin-1")


def _declared_charset(data: bytes) -> str:
    msh = sniff_msh(data)
    if msh is None:
        return ""
    value = re.split(r"[~^&]", msh.field(18), maxsplit=1)[0]
    return value.encode("ascii", errors="ignore").decode("ascii").strip().upper()
