"""A CDISC dataset as the writers see it: variables with their metadata, and rows of plain values.

Why one model for both formats: SAS transport and Dataset-JSON must carry the same variables,
labels and values, so the rules that make a dataset exportable — SAS transport v5's limits on
names, labels and character values — are enforced here, once, and both writers inherit them:

- a dataset or variable name is 1–8 characters, uppercase letters, digits and ``_``, starting
  with a letter; a label is at most 40 ASCII characters. Our own metadata breaks neither, so a
  violation is a programming error and raises at import time;
- a character value longer than 200 bytes (UTF-8) is **truncated** to the longest prefix of whole
  characters that fits in 200 bytes — the SDTM convention would split the rest into a
  supplemental qualifier, which these exports do not produce (docs/exports.md). Only free text
  (an adverse event's term, an identifier a site chose) can be that long.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

MAX_TEXT_BYTES = 200
MAX_LABEL = 40
_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,7}")

Kind = Literal["text", "integer", "float", "iso_date", "iso_datetime", "sas_date"]
"""How a variable is typed in each format:

- ``text``: character (SAS ``$``), Dataset-JSON ``string``;
- ``integer`` / ``float``: numeric, Dataset-JSON ``integer`` / ``double``;
- ``iso_date`` / ``iso_datetime``: SDTM's ``--DTC``, an ISO 8601 character value, Dataset-JSON
  ``date`` / ``datetime``;
- ``sas_date``: ADaM's numeric ``*DT``, days since 1960-01-01 with format ``DATE9.`` in SAS,
  Dataset-JSON ``date`` exchanged as an ISO string with ``targetDataType`` ``integer``.
"""

CHARACTER_KINDS: frozenset[Kind] = frozenset({"text", "iso_date", "iso_datetime"})


@dataclass(frozen=True, slots=True)
class Variable:
    """One column: its name, label, kind and (for key variables) its position in the key."""

    name: str
    label: str
    kind: Kind = "text"
    key: int | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_label(self.label, self.name)

    @property
    def character(self) -> bool:
        return self.kind in CHARACTER_KINDS


@dataclass(frozen=True, slots=True)
class Dataset:
    """A named, labelled table: ``rows`` hold one value per variable, in variable order —
    ``str`` (already cut to 200 bytes), ``int``, ``float``, ``date``, ``datetime`` or ``None``."""

    name: str
    label: str
    variables: tuple[Variable, ...]
    rows: tuple[tuple[Any, ...], ...]

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_label(self.label, self.name)

    def column(self, name: str) -> list[Any]:
        index = [v.name for v in self.variables].index(name)
        return [row[index] for row in self.rows]

    def records(self) -> list[dict[str, Any]]:
        names = [v.name for v in self.variables]
        return [dict(zip(names, row, strict=True)) for row in self.rows]


def dataset(name: str, label: str, variables: tuple[Variable, ...], records: Iterable[Mapping[str, Any]]) -> Dataset:
    """Rows from records keyed by variable name (a missing key is a missing value; an unknown one
    is a programming error), each text value cut to the v5 limit (module docstring)."""
    names = {v.name for v in variables}
    rows = []
    for record in records:
        unknown = set(record) - names
        if unknown:
            raise KeyError(f"{name}: no variable {sorted(unknown)}")
        rows.append(tuple(_cell(v, record.get(v.name)) for v in variables))
    return Dataset(name, label, variables, tuple(rows))


def truncated(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits in ``limit`` bytes."""
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode(errors="ignore")


def _cell(variable: Variable, value: Any) -> Any:
    if value is None:
        return None
    if variable.kind == "text":
        return truncated(str(value))
    if variable.kind == "iso_date":
        return value.isoformat() if isinstance(value, date) else str(value)
    if variable.kind == "iso_datetime":
        return _utc(value).strftime("%Y-%m-%dT%H:%M:%S") if isinstance(value, datetime) else str(value)
    return value


def _utc(moment: datetime) -> datetime:
    """``--DTC`` times are written in UTC, without an offset (docs/exports.md)."""
    return moment.astimezone(UTC) if moment.tzinfo else moment


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a SAS transport v5 name (1-8 of A-Z, 0-9, _; a letter first)")


def _check_label(label: str, name: str) -> None:
    if len(label) > MAX_LABEL or not label.isascii():
        raise ValueError(f"the label of {name} is not at most {MAX_LABEL} ASCII characters: {label!r}")
