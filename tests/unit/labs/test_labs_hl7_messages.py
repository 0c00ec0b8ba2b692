"""HL7 v2.x ORU^R01 parsing, decoding and ACKs (contract, "Lab results in" 2)."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.labs.hl7_acks import build_ack
from services.labs.hl7_charsets import decode_hl7_bytes
from services.labs.hl7_messages import (
    MAX_MESSAGE_CHARS,
    Hl7MessageError,
    ObxError,
    ParsedOru,
    parse_oru,
)
from services.labs.hl7_msh import sniff_msh
from services.labs.inputs import IncomingResult, LabRejection


def seg(name: str, fields: dict[int, str]) -> str:
    """A segment with each field at its HL7 position (``fields[5]`` is ``<name>-5``)."""
    return "|".join([name] + [fields.get(number, "") for number in range(1, max(fields) + 1)])


def obx(set_id: int, code: str, value: str, unit: str, status: str = "F", *, value_type: str = "NM",
        observed: str = "", instance: str = "") -> str:
    return seg("OBX", {1: str(set_id), 2: value_type, 3: code, 5: value, 6: unit, 7: "", 11: status,
                       14: observed, 21: instance})


MSH_25 = ("MSH|^~\\&|LIS|CENTRAL LAB^2.16.840.1.113883.3.4.5^ISO|NEPHROTRACK|STUDY|20150601093000+0200||"
          "ORU^R01^ORU_R01|MSG00001|P|2.5.1|||AL|NE||UNICODE UTF-8")
V25 = [
    MSH_25,
    seg("PID", {1: "1", 3: "IGA-A-001^^^STUDY^PI", 5: "PSEUDONYM^SUBJECT"}),
    seg("PV1", {1: "1", 2: "O"}),
    seg("ORC", {1: "RE", 2: "ORD448811^NEPHRO", 3: "FIL-2015-0601^LIS"}),
    seg("OBR", {1: "1", 2: "ORD448811^NEPHRO", 3: "FIL-2015-0601^LIS", 4: "24362-6^Renal function panel^LN",
                7: "20150601083000+0200", 22: "20150601120000+0200", 25: "F"}),
    obx(1, "2160-0^Creatinine [Mass/volume] in Serum or Plasma^LN", "2.1", "mg/dL^mg/dL^UCUM",
        observed="20150601083000+0200"),
    obx(2, "14682-9^Creatinine [Moles/volume] in Serum or Plasma^LN", "185.7", "umol/L^umol/L^UCUM",
        observed="20150601083000+0200"),
    seg("NTE", {1: "1", 2: "L", 3: "Slightly haemolysed sample"}),
    obx(3, "98979-8^eGFR CKD-EPI 2021^LN", "27.4", "mL/min/{1.73_m2}", observed="20150601083000+0200",
        instance="EGFR-2015-0601-1"),
]

MSH_23 = "MSH|^~\\&|LABSYS|SOUTH LAB|NT|STUDY|201506020915||ORU^R01|A23-778|P|2.3"
V23 = [
    MSH_23,
    seg("PID", {1: "1", 3: "IGA-B-007", 5: "PSEUDONYM"}),
    seg("PV1", {1: "1", 2: "O"}),
    seg("ORC", {1: "RE", 3: "F77"}),
    seg("OBR", {1: "1", 3: "F77", 4: "2160-0^Creatinine^LN", 7: "201506010830"}),
    obx(1, "2160-0^Creatinine^LN", "1.9", "MG/DL", "C"),
    obx(2, "33914-3^eGFR MDRD^LN", "31", "mL/min/1.73m2", "P"),
]


def message(segments: list[str], separator: str = "\r") -> str:
    return separator.join(segments) + separator


def parse(segments: list[str]) -> ParsedOru:
    return parse_oru(message(segments))


def message_code(text: str) -> str:
    with pytest.raises(Hl7MessageError) as caught:
        parse_oru(text)
    return caught.value.code


def only_error(segments: list[str]) -> ObxError:
    (error,) = parse(segments).errors
    return error


# --------------------------------------------------------------------------- happy paths


def test_v25_oru_with_three_results():
    parsed = parse(V25)
    assert (parsed.control_id, parsed.version, parsed.lab_id, parsed.processing_id) == (
        "MSG00001", "2.5.1", "CENTRAL LAB", "P")
    assert parsed.sending_facility == ("CENTRAL LAB", "2.16.840.1.113883.3.4.5", "ISO")
    assert parsed.errors == []
    creat_mg, creat_umol, egfr = parsed.results
    assert all(r.source == "mllp" and r.subject_id == "IGA-A-001" and r.message_id == "MSG00001"
               for r in parsed.results)
    assert (creat_mg.loinc, creat_mg.value, creat_mg.unit, creat_mg.status) == ("2160-0", 2.1, "mg/dL", "final")
    assert creat_mg.collected_at == datetime(2015, 6, 1, 6, 30, tzinfo=UTC)
    assert (creat_umol.loinc, creat_umol.value, creat_umol.unit) == ("14682-9", 185.7, "umol/L")
    # Result ids: OBR-3 filler number suffixed with the LOINC, unless OBX-21 names the instance.
    assert creat_mg.result_id == "FIL-2015-0601-2160-0"
    assert creat_umol.result_id == "FIL-2015-0601-14682-9"
    assert egfr.result_id == "EGFR-2015-0601-1"
    assert (egfr.loinc, egfr.value, egfr.unit) == ("98979-8", 27.4, "mL/min/{1.73_m2}")
    assert creat_mg.raw == parsed.raw


def test_v23_statuses_and_obr7_fallback():
    parsed = parse(V23)
    corrected, preliminary = parsed.results
    assert (corrected.status, preliminary.status) == ("corrected", "preliminary")
    # No OBX-14: OBR-7 (no offset: UTC).
    assert corrected.collected_at == datetime(2015, 6, 1, 8, 30, tzinfo=UTC)
    assert (corrected.result_id, preliminary.result_id) == ("F77-2160-0", "F77-33914-3")
    assert parsed.lab_id == "SOUTH LAB"


@pytest.mark.parametrize("separator", ["\r", "\n", "\r\n"])
def test_segment_separators(separator):
    # Segments are re-joined with CR, so even ``raw`` is the same whatever the separator.
    assert parse_oru(message(V25, separator)).results == parse(V25).results


def test_mllp_framing_is_stripped():
    assert len(parse_oru("\x0b" + message(V25) + "\x1c\r").results) == 3


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        ("20150601", datetime(2015, 6, 1, tzinfo=UTC)),
        ("201506010830", datetime(2015, 6, 1, 8, 30, tzinfo=UTC)),
        ("20150601083015", datetime(2015, 6, 1, 8, 30, 15, tzinfo=UTC)),
        ("20150601083015.25", datetime(2015, 6, 1, 8, 30, 15, 250000, tzinfo=UTC)),
        ("20150601083015-0500", datetime(2015, 6, 1, 13, 30, 15, tzinfo=UTC)),
        ("20150601083015.1234+0130", datetime(2015, 6, 1, 7, 0, 15, 123400, tzinfo=UTC)),
    ],
)
def test_hl7_timestamps(timestamp, expected):
    segments = V25[:5] + [obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", observed=timestamp)]
    assert parse(segments).results[0].collected_at == expected


def test_loinc_in_alternate_coding_triplet():
    segments = V25[:5] + [obx(1, "CREA^Creatinine^L^2160-0^Creatinine^LN", "2.1", "mg/dL")]
    assert parse(segments).results[0].loinc == "2160-0"


def test_structured_numeric_value():
    segments = V25[:5] + [obx(1, "2160-0^Creatinine^LN", "=^2.1", "mg/dL", value_type="SN")]
    assert parse(segments).results[0].value == 2.1


def test_several_patients_in_one_message():
    segments = V25[:6] + [seg("PID", {1: "2", 3: "IGA-C-010"}), seg("OBR", {1: "1", 3: "FIL-9", 7: "20150601"}),
                          obx(1, "2160-0^Creatinine^LN", "1.1", "mg/dL")]
    first, second = parse(segments).results
    assert (first.subject_id, second.subject_id, second.result_id) == ("IGA-A-001", "IGA-C-010", "FIL-9-2160-0")


# --------------------------------------------------------------------------- decoding


def test_decode_honours_msh18_latin1():
    text = message([MSH_25.replace("UNICODE UTF-8", "8859/1"), V25[1], seg("NTE", {3: "Hämolyse"})])
    assert decode_hl7_bytes(text.encode("latin-1")) == text


def test_decode_falls_back_when_bytes_are_not_the_declared_charset():
    text = message([MSH_25, V25[1], seg("NTE", {3: "Hämolyse"})])  # declares UTF-8
    assert decode_hl7_bytes(text.encode("latin-1")) == text  # ... but sent Latin-1


def test_decode_ascii_declared_utf8_sent():
    text = message([MSH_25.replace("UNICODE UTF-8", "ASCII"), V25[1], seg("NTE", {3: "Hämolyse"})])
    assert decode_hl7_bytes(text.encode("utf-8")) == text


def test_decode_defaults_to_utf8_then_latin1():
    text = message(V23 + [seg("NTE", {3: "µmol"})])
    assert decode_hl7_bytes(text.encode("utf-8")) == text
    assert decode_hl7_bytes(text.encode("latin-1")) == text
    assert decode_hl7_bytes(b"\x00\xff garbage") == "\x00\xff garbage"


def test_decoded_bytes_parse_end_to_end():
    assert len(parse_oru(decode_hl7_bytes(message(V25).encode())).results) == 3


# --------------------------------------------------------------------------- per-OBX errors


@pytest.mark.parametrize(
    ("bad_obx", "code", "field"),
    [
        (obx(1, "1234-5^Unknown test^LN", "2.1", "mg/dL"), "unknown_loinc", 3),
        (obx(1, "CREA^Creatinine^99LOCAL", "2.1", "mg/dL"), "unknown_loinc", 3),
        (obx(1, "", "2.1", "mg/dL"), "unknown_loinc", 3),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mmol/L"), "unit_mismatch", 6),
        (obx(1, "2160-0^Creatinine^LN", "2.1", ""), "missing_unit", 6),
        (obx(1, "2160-0^Creatinine^LN", "abc", "mg/dL"), "not_a_number", 5),
        (obx(1, "2160-0^Creatinine^LN", "1,2", "mg/dL"), "not_a_number", 5),
        (obx(1, "2160-0^Creatinine^LN", "1e3", "mg/dL"), "not_a_number", 5),
        (obx(1, "2160-0^Creatinine^LN", "", "mg/dL"), "missing_value", 5),
        (obx(1, "98979-8^eGFR^LN", ">90", "mL/min/1.73m2"), "censored_value", 5),
        (obx(1, "98979-8^eGFR^LN", ">^60", "mL/min/1.73m2", value_type="SN"), "censored_value", 5),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", value_type="TX"), "not_a_number", 2),
        (obx(1, "2160-0^Creatinine^LN", "45", "mg/dL"), "value_out_of_range", 5),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", "X"), "unsupported_status", 11),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", "D"), "unsupported_status", 11),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", observed="2015-06-01"), "bad_datetime", 14),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", observed="20151341"), "bad_datetime", 14),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", observed="201506"), "bad_datetime", 14),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", observed="18991231"), "collected_too_early", 14),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", instance="R 1; DROP"), "bad_result_id", 21),
        (obx(1, "2160-0^Creatinine^LN", "'; DROP TABLE lab_results;--", "mg/dL"), "not_a_number", 5),
        (obx(1, "2160-0^Creatinine^LN", "\\.sky\\", "mg/dL"), "bad_escape", 5),
        (obx(1, "2160-0^Creatinine^LN", "1\\Z5", "mg/dL"), "bad_escape", 5),  # was read as 1
        (obx(1, "2160-0^Creatinine^LN", "1\\Z\\5", "mg/dL"), "bad_escape", 5),  # was read as 15
        (obx(1, "2160-0^Creatinine^LN", "1\\H\\.5", "mg/dL"), "bad_escape", 5),  # highlighting: text only
        (obx(1, "2160-0^Creatinine^LN", "\\X31\\.\\X3\\", "mg/dL"), "bad_escape", 5),
        (obx(1, "2160\\C2842\\-0^Creatinine^LN", "2.1", "mg/dL"), "bad_escape", 3),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg\\M2442\\/dL"), "bad_escape", 6),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", observed="2015\\\\0601"), "bad_escape", 14),
        (obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL", instance="R-\\Z1\\"), "bad_escape", 21),
    ],
)
def test_obx_errors_are_specific_and_do_not_spoil_the_message(bad_obx, code, field):
    parsed = parse(V25 + [bad_obx.replace("OBX|1|", "OBX|4|", 1)])
    assert len(parsed.results) == 3
    error = only_error(V25 + [bad_obx.replace("OBX|1|", "OBX|4|", 1)])
    assert (error.obx_index, error.set_id, error.code, error.field) == (4, "4", code, field)
    assert error.reason and error.subject_id == "IGA-A-001"


def test_missing_collection_time_everywhere():
    segments = [MSH_23, V23[1], seg("OBR", {1: "1", 3: "F1"}), obx(1, "2160-0^Creatinine^LN", "1.0", "mg/dL")]
    assert only_error(segments).code == "missing_collected_at"


def test_missing_result_id():
    segments = [MSH_23, V23[1], seg("OBR", {1: "1", 7: "20150601"}), obx(1, "2160-0^Creatinine^LN", "1.0", "mg/dL")]
    assert only_error(segments).code == "missing_result_id"


def test_two_obx_with_the_same_result_id():
    segments = V25[:6] + [obx(2, "2160-0^Creatinine^LN", "2.2", "mg/dL", observed="20150601")]
    error = only_error(segments)
    assert (error.obx_index, error.code) == (2, "duplicate_result_id")


def test_sql_injection_in_pid3_is_refused_per_obx():
    segments = [MSH_25, seg("PID", {3: "x' OR '1'='1"})] + V25[3:6]
    assert only_error(segments).code == "bad_subject_id"


def test_empty_pid3():
    segments = [MSH_25, seg("PID", {1: "1"})] + V25[3:6]
    assert only_error(segments).code == "bad_subject_id"


def test_standard_escapes_are_decoded_in_the_fields_read():
    segments = V25[:5] + [obx(1, "2160-0^Creatinine^LN", "\\X32\\.1", "^\\H\\mg/dL\\N\\",
                              instance="R\\X2D\\1")]
    (result,) = parse(segments).results
    assert (result.value, result.unit, result.result_id) == (2.1, "mg/dL", "R-1")
    msh = MSH_25.replace("|CENTRAL LAB^", "|LAB \\T\\ CO \\XC3A9\\\\F\\1^", 1)
    assert parse([msh] + V25[1:]).lab_id == "LAB & CO \u00e9|1"


def test_an_escape_in_an_order_field_is_refused_for_its_obx_without_locating_it_on_the_obx():
    order = seg("OBR", {1: "1", 3: "FIL\\Z\\1^LIS", 7: "20150601083000+0200"})
    error = only_error([MSH_25, V25[1], order, obx(1, "2160-0^Creatinine^LN", "2.1", "mg/dL")])
    assert (error.code, error.field) == ("bad_escape", None) and error.reason.startswith("OBR-3 has ")


@pytest.mark.parametrize(
    ("segments", "where"),
    [
        ([MSH_25, seg("PID", {1: "1", 3: "IGA\\Z-A-001^^^STUDY^PI"})] + V25[2:], "PID-3"),  # was subject IGA
        ([MSH_25, seg("PID", {1: "1", 3: "IGA\\Z\\-A-001"})] + V25[2:], "PID-3"),
        ([MSH_25.replace("|MSG00001|", "|MSG\\Z\\00001|")] + V25[1:], "MSH-10"),
        ([MSH_25.replace("|CENTRAL LAB^", "|CENTRAL\\.br\\LAB^")] + V25[1:], "MSH-4"),
        ([MSH_25.replace("|2.5.1|", "|2.5\\Z\\.1|")] + V25[1:], "MSH-12"),
    ],
)
def test_an_escape_in_the_subject_or_header_refuses_the_message(segments, where):
    with pytest.raises(Hl7MessageError) as caught:
        parse(segments)
    assert caught.value.code == "bad_escape"
    assert caught.value.reason.startswith(f"{where} has ")
    assert "\\Z" in caught.value.reason or "\\.br\\" in caught.value.reason
    assert "A-001" not in caught.value.reason  # the sequence is named, not the identifier around it


def test_no_field_text_reaches_the_log(caplog):
    """python-hl7 logged the whole field (``field [IGA\\Z\\A-001]``) of a sequence it dropped."""
    caplog.set_level(logging.DEBUG)
    pid = seg("PID", {1: "1", 3: "IGA\\Z\\A-001^^^STUDY^PI"})
    for segments in ([MSH_25, pid] + V25[2:], V25 + [obx(4, "2160-0^Cr^LN", "1\\Z\\5", "mg/dL", instance="A-001X")],
                     V25[:5] + [obx(1, "2160-0^Cr^LN", "1.5", "mg/dL", instance="A-001\\C2842\\")]):
        with contextlib.suppress(Hl7MessageError):
            parse(segments)
    assert not [record.getMessage() for record in caplog.records if "A-001" in record.getMessage()]


def test_rejections_carry_the_message():
    parsed = parse(V25 + [obx(4, "1234-5^X^LN", "1", "mg/dL")])
    (rejection,) = parsed.rejections()
    assert isinstance(rejection, LabRejection)
    assert (rejection.code, rejection.message_id, rejection.subject_id, rejection.raw) == (
        "unknown_loinc", "MSG00001", "IGA-A-001", parsed.raw)
    assert rejection.reason.startswith("OBX 4: ")


# --------------------------------------------------------------------------- message-level errors


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "not_hl7"),
        ("hello world", "not_hl7"),
        ("PID|1||IGA-A-001", "not_hl7"),
        ("MSH", "bad_delimiters"),
        ("MSH|^~\\&", "bad_delimiters"),
        ("MSHA^~\\&|", "bad_delimiters"),
        ("MSH|^~|LAB|", "bad_delimiters"),
        ("MSH|^~\\&|LIS|LAB|", "not_oru_r01"),  # truncated before MSH-9
        (message(V25[:1]), "no_pid"),
        (message([MSH_25, V25[1]]), "no_obx"),
        (message([MSH_25] + V25[2:]), "no_pid"),
        (message([MSH_25.replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01")] + V25[1:]), "not_oru_r01"),
        (message([MSH_25.replace("ORU^R01^ORU_R01", "ORU^R30")] + V25[1:]), "not_oru_r01"),
        (message([MSH_25.replace("|MSG00001|", "||")] + V25[1:]), "missing_control_id"),
        (message([MSH_25.replace("|MSG00001|", "|1'; DROP TABLE x;--|")] + V25[1:]), "bad_control_id"),
        (message([MSH_25.replace("|2.5.1|", "|3.0|")] + V25[1:]), "bad_version"),
        (message(V25 + [MSH_23] + V23[1:]), "batch_not_supported"),
        (message(V25[:2] + ["\x00\x01\x02binary junk"] + V25[2:]), "malformed_segment"),
        (message(V25[:2] + ["pid|lowercase"]), "malformed_segment"),
        ("MSH|^~\\&|" + "A" * MAX_MESSAGE_CHARS, "message_too_large"),
        ("MSH|^~\\&|\udc80", "bad_encoding"),
    ],
)
def test_message_level_refusals(text, code):
    assert message_code(text) == code


def test_message_error_carries_control_id_and_raw():
    text = message([MSH_25.replace("ORU^R01^ORU_R01", "ADT^A01")] + V25[1:])
    with pytest.raises(Hl7MessageError) as caught:
        parse_oru(text)
    assert caught.value.message_id == "MSG00001"
    assert caught.value.raw == text.rstrip("\r")
    assert "ADT^A01" in caught.value.reason


# --------------------------------------------------------------------------- ACKs

WHEN = datetime(2024, 2, 3, 4, 5, 6, tzinfo=UTC)


def ack_of(*args, **kwargs) -> hl7.Message:
    text = build_ack(*args, control_id="ACK0001", now=WHEN, **kwargs)
    assert text.endswith("\r") and "\n" not in text and text.isascii()
    return hl7.parse(text)


def test_aa_ack_swaps_applications_and_keeps_version():
    ack = ack_of(parse(V25), "AA")
    msh = ack.segment("MSH")
    assert str(msh(3)) == "NEPHROTRACK" and str(msh(4)) == "STUDY"
    assert str(msh(5)) == "LIS" and str(msh(6)) == "CENTRAL LAB^2.16.840.1.113883.3.4.5^ISO"
    assert (str(msh(7)), str(msh(9)), str(msh(10)), str(msh(11)), str(msh(12))) == (
        "20240203040506+0000", "ACK^R01^ACK", "ACK0001", "P", "2.5.1")
    assert str(ack.segment("MSA")) == "MSA|AA|MSG00001"
    with pytest.raises(KeyError):
        ack.segment("ERR")


def test_ae_ack_v25_has_one_err_per_bad_obx():
    parsed = parse(V25 + [obx(4, "1234-5^X^LN", "1", "mg/dL"), obx(5, "2160-0^Cr^LN", "abc", "mg/dL")])
    ack = ack_of(parsed, "AE", errors=parsed.errors)
    msa = ack.segment("MSA")
    assert (str(msa(1)), str(msa(2))) == ("AE", "MSG00001")
    assert "OBX 4:" in ack.unescape(str(msa(3)))
    first, second = ack.segments("ERR")
    assert (str(first(2)), str(first(3)), str(first(4)), str(first(5))) == (
        "OBX^4^3", "103^Table value not found^HL70357", "E", "unknown_loinc")
    assert "1234-5" in ack.unescape(str(first(8)))
    assert (str(second(2)), str(second(3))) == ("OBX^5^5", "102^Data type error^HL70357")


def test_ae_ack_v23_uses_err1():
    parsed = parse(V23 + [obx(3, "1234-5^X^LN", "1", "mg/dL")])
    ack = ack_of(parsed, "AE", errors=parsed.errors)
    assert str(ack.segment("ERR")(1)) == "OBX^3^3^103&Table value not found&HL70357"
    assert str(ack.segment("MSH")(12)) == "2.3"


def test_ar_ack_for_a_refused_message_reads_the_raw_header():
    text = message([MSH_25.replace("ORU^R01^ORU_R01", "ADT^A01")] + V25[1:])
    with pytest.raises(Hl7MessageError) as caught:
        parse_oru(text)
    ack = ack_of(text.encode(), "AR", caught.value.reason, error_code=caught.value.code)
    assert str(ack.segment("MSA")(2)) == "MSG00001"
    assert str(ack.segment("MSH")(5)) == "LIS"
    assert str(ack.segment("ERR")(3)) == "200^Unsupported message type^HL70357"


@pytest.mark.parametrize("source", [None, b"\x00\x01 junk", "not hl7 at all", "MSH|", "MSH|^~\\&|A|B"])
def test_ar_ack_for_garbage_uses_fallbacks(source):
    ack = ack_of(source, "AR", "not an HL7 v2 message", error_code="not_hl7")
    assert str(ack.segment("MSA")(2)) == "UNKNOWN"
    assert str(ack.segment("MSH")(12)) == "2.5"
    assert str(ack.segment("MSH")(3)) == "NEPHROTRACK"


def test_ack_escapes_delimiters_and_non_ascii_in_reasons():
    ack = ack_of(parse(V25), "AE", "bad | value ^ with & and ~ and \\ and µ\rnewline")
    err = ack.segment("ERR")
    assert ack.unescape(str(err(8))) == "bad | value ^ with & and ~ and \\ and ? newline"


def test_error_for_locates_a_later_refusal():
    parsed = parse(V25)
    egfr = parsed.results[2]
    error = parsed.error_for(egfr, LabRejection("collected in the future", "collected_in_future"))
    assert (error.obx_index, error.code, error.result_id) == (3, "collected_in_future", "EGFR-2015-0601-1")
    ack = ack_of(parsed, "AE", errors=[error])
    assert str(ack.segment("ERR")(2)) == "OBX^3"


def test_ack_code_is_checked():
    with pytest.raises(ValueError):
        build_ack(None, "XX")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- fuzz

VALID = message(V25)


def accepts_or_refuses(text: str) -> None:
    try:
        parsed = parse_oru(text)
    except Hl7MessageError as error:
        assert error.reason and error.code
        build_ack(text, "AR", error.reason, error_code=error.code)
    else:
        assert all(isinstance(item, IncomingResult | ObxError) for item in parsed.items)
        build_ack(parsed, "AE", errors=parsed.errors)


@given(st.text(max_size=400))
def test_fuzz_arbitrary_text(text):
    accepts_or_refuses(text)


@given(st.text(alphabet="MSHPIDOBXR|^~\\&\r\n0123456789.-+ FCPLN", max_size=300))
def test_fuzz_hl7_alphabet(text):
    accepts_or_refuses("MSH|^~\\&|" + text)


@given(st.binary(max_size=400))
def test_fuzz_bytes_decode_then_parse(data):
    accepts_or_refuses(decode_hl7_bytes(data))


@settings(max_examples=200)
@given(st.integers(0, len(VALID)), st.integers(0, 40), st.text(alphabet="|^~\\&\r\nX9.-'\";", max_size=8))
def test_fuzz_mutations_of_a_valid_message(position, cut, insert):
    accepts_or_refuses(VALID[:position] + insert + VALID[position + cut:])


@given(st.binary(max_size=200))
def test_fuzz_msh18_prefixed_bytes(data):
    """MSH-18 declares Latin-1, which decodes every byte: whatever follows, the declared charset is used."""
    head = MSH_25.replace("UNICODE UTF-8", "8859/1").encode()
    assert decode_hl7_bytes(head + b"\r" + data) == (head + b"\r" + data).decode("iso8859-1")


@pytest.mark.parametrize("segments", [V25, V23])
def test_the_msh_sniffer_reads_the_header_as_the_parser_does(segments):
    text = message(segments)
    parsed = parse_oru(text)
    for source in (text, b"\x0b\r\n" + text.encode() + b"\x1c\r"):
        msh = sniff_msh(source)
        assert msh is not None
        assert (msh.first(10), msh.first(11), msh.first(12)) == (parsed.control_id, parsed.processing_id, parsed.version)
        assert (msh.separator, msh.component, msh.repetition) == ("|", "^", "~")


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_the_msh_sniffer_never_raises_and_finds_only_an_msh(source):
    msh = sniff_msh(source)
    text = (source.decode("latin-1") if isinstance(source, bytes) else source).lstrip("\x0b\r\n\t ")
    if msh is None:
        assert not text.startswith("MSH") or len(text) < 4 or text[3] in "\r\n"
    else:
        assert msh.fields[0] == "MSH" and msh.separator == text[3]
        assert text.startswith(msh.separator.join(msh.fields))
