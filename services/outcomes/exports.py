"""Per-patient exports (CSV, Parquet): one row per enrolled patient, values unrounded.

Columns: the contract's values first, in the order the contract defines them, then the extras
(change, decline flag, counts). Both formats have the same columns, so an analyst can switch
between them without re-mapping anything.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import date
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pyarrow as pa
import pyarrow.parquet as pq

from services.outcomes.domain import PatientOutcome

CONTRACT_COLUMNS: tuple[str, ...] = (
    "subject_id", "group", "sex", "age_years", "enrolled_on", "treatment_start",
    "baseline_egfr", "post_egfr", "followup_years", "egfr_slope",
    "kidney_failure", "kidney_failure_years",
)
COLUMNS: tuple[str, ...] = CONTRACT_COLUMNS + tuple(
    name for name in PatientOutcome.model_fields if name not in CONTRACT_COLUMNS
)


FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet evaluate a text cell (OWASP, CSV injection)."""


def _csv_cell(value: Any) -> str:
    """Empty for undefined; ``true``/``false`` as in the JSON API; floats as their exact repr;
    text that a spreadsheet would run as a formula prefixed with ``'`` (:func:`_neutralised`)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        return _neutralised(value)
    return str(value)


def _neutralised(text: str) -> str:
    """OWASP's rule for CSV injection: a text cell starting with ``= + - @``, a tab or a carriage
    return gets a leading ``'``, so a spreadsheet shows it instead of evaluating it. Enrollment
    refuses such subject ids, but older data may hold them. Only text: a number such as a
    negative slope (``-1.2``) stays a number."""
    return "'" + text if text.startswith(FORMULA_TRIGGERS) else text


def patients_csv(outcomes: Sequence[PatientOutcome]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for outcome in outcomes:
        writer.writerow([_csv_cell(getattr(outcome, column)) for column in COLUMNS])
    return buffer.getvalue()


_ARROW_TYPES: dict[Any, pa.DataType] = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), date: pa.date32()}


def _arrow_type(annotation: Any) -> pa.DataType:
    """The Arrow type of a ``PatientOutcome`` field: ``X | None`` is a nullable X; literals
    (group, sex, baseline source) are strings."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    base = args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 else annotation
    return _ARROW_TYPES.get(base, pa.string())


SCHEMA = pa.schema([
    pa.field(name, _arrow_type(PatientOutcome.model_fields[name].annotation),
             nullable=name not in ("subject_id", "group"))
    for name in COLUMNS
])


def patients_parquet(outcomes: Sequence[PatientOutcome]) -> bytes:
    columns = {name: [getattr(o, name) for o in outcomes] for name in COLUMNS}
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
