"""CDISC Dataset-JSON 1.1 (``.json``): the top-level attributes, ``columns`` and ``rows`` in the
order the specification recommends (so a streaming reader meets the metadata first).

Data types (specification, "Supported Column Data Type Combinations"): text ``string``,
integers ``integer``, other numbers ``double``, SDTM's ``--DTC`` ``date`` / ``datetime`` (ISO
strings), ADaM's numeric dates ``date`` exchanged as ISO strings with ``targetDataType``
``integer`` and ``displayFormat`` ``DATE9.`` — what a SAS dataset made from the file holds.
A missing value is ``null``.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from importlib.metadata import version as package_version
from typing import Any

from services.outcomes.cdisc.model import Dataset, Kind, Variable
from services.outcomes.cdisc.study import STUDYID

VERSION = "1.1.0"
MEDIA_TYPE = "application/json"
ORIGINATOR = "nephrotrack"
SOURCE_SYSTEM = {"name": "nephrotrack outcomes", "version": package_version("nephrotrack")}

DATA_TYPES: dict[Kind, str] = {
    "text": "string", "integer": "integer", "float": "double",
    "iso_date": "date", "iso_datetime": "datetime", "sas_date": "date",
}


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S") + "Z"


def _column(dataset: Dataset, variable: Variable) -> dict[str, Any]:
    column: dict[str, Any] = {
        "itemOID": f"IT.{dataset.name}.{variable.name}", "name": variable.name, "label": variable.label,
        "dataType": DATA_TYPES[variable.kind],
    }
    if variable.kind == "sas_date":
        column["targetDataType"] = "integer"
    if variable.kind == "text":
        column["length"] = max((len(v.encode()) for v in dataset.column(variable.name) if v), default=1)
    if variable.kind == "sas_date":
        column["displayFormat"] = "DATE9."
    if variable.key is not None:
        column["keySequence"] = variable.key
    return column


def _value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, date) else value


def to_dataset_json(dataset: Dataset, created_at: datetime, db_last_modified: datetime | None = None) -> bytes:
    """The dataset as a Dataset-JSON 1.1 document. ``db_last_modified``: when the projection
    last changed (its newest applied event), never after ``created_at``."""
    document: dict[str, Any] = {
        "datasetJSONCreationDateTime": _timestamp(created_at),
        "datasetJSONVersion": VERSION,
        "fileOID": f"{STUDYID}.{dataset.name}.{created_at.astimezone(UTC):%Y%m%dT%H%M%S}",
    }
    if db_last_modified is not None:
        document["dbLastModifiedDateTime"] = _timestamp(min(db_last_modified, created_at))
    document.update({
        "originator": ORIGINATOR,
        "sourceSystem": SOURCE_SYSTEM,
        "studyOID": STUDYID,
        "itemGroupOID": f"IG.{dataset.name}",
        "records": len(dataset.rows),
        "name": dataset.name,
        "label": dataset.label,
        "columns": [_column(dataset, v) for v in dataset.variables],
        "rows": [[_value(value) for value in row] for row in dataset.rows],
    })
    return json.dumps(document, ensure_ascii=False, allow_nan=False).encode()
