"""SAS transport version 5 (``.xpt``), the format FDA accepts for SDTM and ADaM, via pyreadstat.

Names, labels and character values already respect v5's limits (:mod:`.model`); here the values
become SAS's two types: character (a missing value is blank: SAS has no null text) and numeric
(missing is ``.``; an ADaM date is days since 1960-01-01, formatted ``DATE9.``).
"""

from __future__ import annotations

import re
import tempfile
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyreadstat

from services.outcomes.cdisc.model import Dataset, Variable

SAS_EPOCH = date(1960, 1, 1)
MEDIA_TYPE = "application/x-sas-xport"


def sas_date(day: date) -> int:
    return (day - SAS_EPOCH).days


def _column(variable: Variable, values: list[Any]) -> pd.Series:
    if variable.character:
        return pd.Series(["" if v is None else v for v in values], dtype=object)
    if variable.kind == "sas_date":
        values = [None if v is None else sas_date(v) for v in values]
    return pd.Series([float("nan") if v is None else float(v) for v in values], dtype="float64")


_STAMP = re.compile(rb"\d\d[A-Z]{3}\d\d:\d\d:\d\d:\d\d")
_STAMP_OFFSETS = (80 + 64, 160, 400 + 64, 480)
"""Where a one-member v5 file keeps its times (16 bytes each): the library header's created and
modified, then the member's (records 2, 3, 6 and 7 of 80 bytes)."""


def stamped(body: bytes, moment: datetime) -> bytes:
    """The file with its four header times set to ``moment`` (UTC) instead of the time of
    writing: a lock's or an ``as_of`` export is then the same bytes whenever it is asked for."""
    text = moment.astimezone(UTC).strftime("%d%b%y:%H:%M:%S").upper().encode()
    patched = bytearray(body)
    for offset in _STAMP_OFFSETS:
        if not _STAMP.fullmatch(body[offset:offset + 16]):
            raise ValueError(f"no transport-file time at byte {offset}: not a one-member v5 file")
        patched[offset:offset + 16] = text
    return bytes(patched)


def to_xpt(dataset: Dataset, created_at: datetime | None = None) -> bytes:
    """The dataset as a v5 transport file: one member named and labelled as the dataset, its
    header times ``created_at`` if given (else the time of writing)."""
    frame = pd.DataFrame({v.name: _column(v, dataset.column(v.name)) for v in dataset.variables})
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"{dataset.name.lower()}.xpt"
        pyreadstat.write_xport(
            frame, str(path), file_label=dataset.label, table_name=dataset.name, file_format_version=5,
            column_labels=[v.label for v in dataset.variables],
            variable_format={v.name: "DATE9." for v in dataset.variables if v.kind == "sas_date"},
        )
        body = path.read_bytes()
    return body if created_at is None else stamped(body, created_at)
