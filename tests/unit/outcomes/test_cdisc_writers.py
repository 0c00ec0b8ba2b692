"""The writers: SAS transport v5 read back by pandas (pyreadstat wrote it), Dataset-JSON 1.1
validated against CDISC's own JSON schema, and the v5 limits every dataset is held to.

``dataset-json-1.1.schema.json`` is CDISC's ``schema/dataset.schema.json`` from
github.com/cdisc-org/DataExchange-DatasetJson (commit a379f49, MIT licence), unchanged.
"""

from __future__ import annotations

import io
import json
import math
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import jsonschema_rs
import pandas as pd
import pyreadstat
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.outcomes.cdisc.catalogue import DATASETS
from services.outcomes.cdisc.dataset_json import to_dataset_json
from services.outcomes.cdisc.model import Dataset, Variable, dataset, truncated
from services.outcomes.cdisc.xpt import to_xpt
from tests.unit.outcomes.cdisc_study import study

SCHEMA = jsonschema_rs.validator_for(json.loads((Path(__file__).parent / "dataset-json-1.1.schema.json").read_text()))
BUILT = {f"{standard}/{name}": build(study()) for standard, names in DATASETS.items() for name, build in names.items()}
CREATED = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)


def test_names_and_labels_outside_the_v5_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="not a SAS transport v5 name"):
        Variable("LBSTRESNX", "Nine characters")
    with pytest.raises(ValueError, match="not a SAS transport v5 name"):
        Variable("lbtest", "Lower case")
    with pytest.raises(ValueError, match="at most 40 ASCII"):
        Variable("LBTEST", "A label of forty-one characters, one more")
    with pytest.raises(KeyError, match="no variable"):
        dataset("LB", "Laboratory Test Results", (Variable("LBTEST", "Name"),), [{"LBTESTX": "x"}])


def test_text_is_cut_to_200_bytes_at_a_character_boundary() -> None:
    assert truncated("é" * 150) == "é" * 100  # 2 bytes each
    assert truncated("a" + "é" * 150) == "a" + "é" * 99  # 199 bytes: half a character is dropped
    assert truncated("short") == "short"
    built = dataset("AE", "Adverse Events", (Variable("AETERM", "Reported Term for the Adverse Event"),),
                    [{"AETERM": "x" * 250}])
    assert built.rows == (("x" * 200,),)


@given(st.text(min_size=60, max_size=300))
def test_truncation_keeps_the_longest_whole_character_prefix_that_fits(text: str) -> None:
    cut = truncated(text)
    encoded = cut.encode()
    assert text.startswith(cut) and len(encoded) <= 200
    if cut != text:  # one more character would not fit
        assert len(text[:len(cut) + 1].encode()) > 200


def _as_written(variable: Variable, value: Any) -> Any:
    """What a SAS transport reader gives back for one of our values: blank text for missing, a
    number (an ADaM date: days since 1960-01-01) or NaN, read here as None."""
    if variable.character:
        return "" if value is None else value
    if value is None:
        return None
    return float((value - date(1960, 1, 1)).days) if variable.kind == "sas_date" else float(value)


PANDAS_ZERO = 16.0 ** -65
"""pandas' transport reader turns an IBM zero (eight zero bytes, as SAS writes it too) into
16⁻⁶⁵: it has no case for zero (pandas/io/sas/sas_xport.py, ``_parse_float_vec``)."""


def _as_read(value: Any) -> Any:
    """NaN is a missing value; pandas' reading of zero is zero."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return 0.0 if value == PANDAS_ZERO else value


@pytest.mark.parametrize("key", sorted(BUILT))
def test_each_xpt_reads_back_in_pandas_with_its_rows(key: str) -> None:
    built = BUILT[key]
    assert built.rows, "every dataset of the study has records"
    body = to_xpt(built)
    assert body.startswith(b"HEADER RECORD*******LIBRARY HEADER RECORD!!!!!!!")  # v5 (v8: LIBV8)
    frame = pd.read_sas(io.BytesIO(body), format="xport", encoding="utf-8")
    assert list(frame.columns) == [v.name for v in built.variables]
    read = [[_as_read(v) for v in row] for row in frame.itertuples(index=False)]
    assert read == [[_as_written(v, value) for v, value in zip(built.variables, row, strict=True)] for row in built.rows]


@pytest.mark.parametrize("key", sorted(BUILT))
def test_each_xpt_is_named_and_labelled_as_its_dataset(key: str, tmp_path: Path) -> None:
    built = BUILT[key]
    path = tmp_path / "dataset.xpt"
    path.write_bytes(to_xpt(built))
    _, meta = pyreadstat.read_xport(str(path))
    assert (meta.table_name, meta.file_label) == (built.name, built.label)
    assert meta.column_names_to_labels == {v.name: v.label for v in built.variables}
    assert {n for n, f in meta.original_variable_types.items() if f == "DATE9."} == {
        v.name for v in built.variables if v.kind == "sas_date"}


def test_an_empty_dataset_is_a_valid_transport_file(tmp_path: Path) -> None:
    """No adverse events yet: a member with its variables and no observations."""
    empty = DATASETS["sdtm"]["ae"](study().__class__(study().subjects, [], [], []))
    path = tmp_path / "ae.xpt"
    path.write_bytes(to_xpt(empty))
    frame, meta = pyreadstat.read_xport(str(path))
    assert (len(frame), meta.table_name, list(frame.columns)) == (0, "AE", [v.name for v in empty.variables])


def test_text_beyond_ascii_survives_the_transport_file() -> None:
    built = dataset("AE", "Adverse Events", (Variable("AETERM", "Reported Term for the Adverse Event"),
                                             Variable("AESEQ", "Sequence Number", "integer")),
                    [{"AETERM": "hyperglycæmia, µ " + "é" * 150, "AESEQ": 1}])
    frame = pd.read_sas(io.BytesIO(to_xpt(built)), format="xport", encoding="utf-8")
    assert frame["AETERM"].tolist() == [built.rows[0][0]] and len(built.rows[0][0].encode()) <= 200


def _dataset_json(built: Dataset) -> dict[str, Any]:
    return json.loads(to_dataset_json(built, CREATED, datetime(2026, 12, 5, 20, 59, 30, tzinfo=UTC)))


@pytest.mark.parametrize("key", sorted(BUILT))
def test_each_dataset_json_is_valid_against_cdisc_schema(key: str) -> None:
    built = BUILT[key]
    document = _dataset_json(built)
    SCHEMA.validate(document)
    assert list(document)[:3] == ["datasetJSONCreationDateTime", "datasetJSONVersion", "fileOID"]
    assert list(document)[-5:] == ["records", "name", "label", "columns", "rows"]
    assert (document["datasetJSONVersion"], document["studyOID"], document["itemGroupOID"]) == (
        "1.1.0", "NEPHROTRACK", f"IG.{built.name}")
    assert (document["datasetJSONCreationDateTime"], document["dbLastModifiedDateTime"]) == (
        "2026-12-05T21:00:00Z", "2026-12-05T20:59:30Z")
    assert (document["records"], document["name"], document["label"]) == (len(built.rows), built.name, built.label)
    assert [(c["itemOID"], c["name"], c["label"]) for c in document["columns"]] == [
        (f"IT.{built.name}.{v.name}", v.name, v.label) for v in built.variables]
    iso = [[value.isoformat() if isinstance(value, date) else value for value in row] for row in built.rows]
    assert document["rows"] == iso


def test_dataset_json_types_follow_the_specification() -> None:
    columns = {c["name"]: c for c in _dataset_json(BUILT["adam/adtte"])["columns"]}
    assert columns["USUBJID"] == {"itemOID": "IT.ADTTE.USUBJID", "name": "USUBJID", "label": "Unique Subject Identifier",
                                  "dataType": "string", "length": len("NEPHROTRACK-IGA-A-001"), "keySequence": 1}
    assert columns["STARTDT"] == {"itemOID": "IT.ADTTE.STARTDT", "name": "STARTDT",
                                  "label": "Time to Event Origin Date for Subject", "dataType": "date",
                                  "targetDataType": "integer", "displayFormat": "DATE9."}
    assert (columns["AVAL"]["dataType"], columns["CNSR"]["dataType"]) == ("integer", "integer")
    lb = {c["name"]: c for c in _dataset_json(BUILT["sdtm/lb"])["columns"]}
    assert (lb["LBSTRESN"]["dataType"], lb["LBDTC"]["dataType"], lb["LBDTC"].get("targetDataType")) == (
        "double", "datetime", None)
