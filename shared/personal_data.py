"""Personal data in identifiers: one set of rules for every service.

The study keeps no names, MRNs or birth dates anywhere (contract), and the subject id is the one
free text that reaches every service, log and export. Enrollment refuses such ids at the door
(:func:`check_pseudonym`); labs refuses results naming them and redacts refused payloads
(services/labs/redaction.py) by the same test (:func:`personal_data_kind`), so the two can never
disagree on what is personal.
"""

from __future__ import annotations

import re
from functools import lru_cache

from shared.errors import Invalid

FORMULA_STARTS = ("-", "=", "+", "@")
"""First characters that make a spreadsheet evaluate a cell (OWASP, CSV injection)."""

_PSEUDONYM_SHAPE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_EMAIL = re.compile(r"\S+@\S+")
_DATE_TRIPLE = re.compile(r"(?<!\d)(\d{1,4})([-/.])(\d{1,2})\2(\d{1,4})(?!\d)", re.ASCII)
_COMPACT_DATE = re.compile(
    r"(?<!\d)(?:(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
    r"|(?:0[1-9]|[12]\d|3[01])(?:0[1-9]|1[0-2])(?:19|20)\d\d)(?!\d)",
    re.ASCII,
)
_MONTH_NAME_DATE = re.compile(
    r"\d{1,2}[-/._ ]?(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*[-/._ ]?\d{2,4}",
    re.ASCII | re.IGNORECASE,
)
_PHONE = re.compile(r"\+?[\d\s().-]+", re.ASCII)
_PHONE_MIN_DIGITS = 7
_MRN_WORD = re.compile(r"(?<![A-Za-z])MRN(?![A-Za-z])", re.IGNORECASE)
_LONG_DIGIT_RUN = re.compile(r"\d{6,}", re.ASCII)
_LETTER_WORDS = re.compile(r"[^\W\d_]+(?:[\s,.'_-]+[^\W\d_]+)*")


def check_pseudonym(subject_id: str) -> None:
    """Refuse a subject id that could identify a person; accept short study codes.

    The study keeps no names, MRNs or birth dates anywhere, and the subject id is the one free
    text that reaches every service, log and export: so personal-data shapes are refused here,
    at the door, each with the pattern it matched. Accepted ids look like ``IGA-A-001``,
    ``CTRL-01`` or ``P0007``: 1..64 ASCII letters, digits, ``-``, ``_`` or ``.``, with at least
    one digit or dash (a bare word is more likely a name than a code), and not starting with a
    character a spreadsheet reads as a formula (:data:`FORMULA_STARTS`). The reason never repeats
    the refused id, since refusals end up in logs and responses.
    """
    reason = personal_data_kind(subject_id)
    if reason is not None:
        raise Invalid(f"the subject id looks like {reason}; use a pseudonymous study code such as IGA-A-001")
    if subject_id.startswith(FORMULA_STARTS):
        raise Invalid(
            "the subject id must not start with '-', '=', '+' or '@': a spreadsheet opening an export "
            "reads such a cell as a formula (CSV injection)"
        )
    if not _PSEUDONYM_SHAPE.fullmatch(subject_id):
        raise Invalid("the subject id must be 1 to 64 characters among ASCII letters, digits, '-', '_' and '.'")
    if not any(ch.isdigit() or ch == "-" for ch in subject_id):
        raise Invalid("the subject id must contain at least one digit or '-', like IGA-A-001")


@lru_cache(maxsize=65_536)
def personal_data_kind(text: str) -> str | None:
    """Name the kind of personal data ``text`` resembles (``"a date (…)"``, ``"a person's name …"``),
    or None (for an empty text too). Most specific first.

    Cached: labs asks it of every result's subject id, and a study has few subjects."""
    if not text:
        return None
    if _EMAIL.search(text):
        return "an email address"
    if _looks_like_date(text):
        return "a date (birth dates must not be used as identifiers)"
    if _looks_like_phone(text):
        return "a phone number"
    if _MRN_WORD.search(text) or _LONG_DIGIT_RUN.search(text):
        return "a medical record number (contains 'MRN' or a run of 6 or more digits)"
    if _looks_like_name(text):
        return "a person's name (words of letters only)"
    return None


def _looks_like_date(text: str) -> bool:
    """Any common written date: ISO ``1990-01-02``, ``02/01/1990``, ``19900102``, ``2 Jan 90``."""
    if _COMPACT_DATE.search(text) or _MONTH_NAME_DATE.search(text):
        return True
    return any(_is_date_triple(m.group(1), m.group(3), m.group(4)) for m in _DATE_TRIPLE.finditer(text))


def _is_date_triple(first: str, middle: str, last: str) -> bool:
    """Whether three digit groups read as year-month-day, day-month-year or month-day-year."""
    if len(first) == 4:
        return len(last) <= 2 and _is_month_day(int(middle), int(last))
    if len(first) <= 2 and len(last) in (2, 4):
        a, b = int(first), int(middle)
        return _is_month_day(b, a) or _is_month_day(a, b)
    return False


def _is_month_day(month: int, day: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= 31


def _looks_like_phone(text: str) -> bool:
    """Digits with phone punctuation only (``+``, spaces, brackets, dashes), 7 digits or more."""
    return bool(_PHONE.fullmatch(text)) and sum(ch.isdigit() for ch in text) >= _PHONE_MIN_DIGITS


def _looks_like_name(text: str) -> bool:
    """Words of letters only, written as people write names: with a space or comma between
    words, or in lower/mixed case (study codes without digits are upper-case, like ``CTRL-A``)."""
    if not _LETTER_WORDS.fullmatch(text.strip()):
        return False
    return any(ch in " ,'" or ch.islower() for ch in text)
