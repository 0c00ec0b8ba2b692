"""HL7 v2 escape sequences in the fields labs reads: standard ones decode back to the text that was
escaped, any other one refuses the field — never a silently changed id, code or value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.labs.hl7_escapes import EscapeError, unescape
from services.labs.hl7_messages import Hl7MessageError, parse_oru
from services.labs.inputs import IncomingResult

SEPARATORS = "\r|~^&"  # python-hl7's: segment, field, repetition, component, subcomponent
_DELIMITERS = {"|": "F", "^": "S", "&": "T", "~": "R", "\\": "E"}


def escape(text: str, hex_chars: str = "") -> str:
    """``text`` as a sender writes it: delimiters and the escape character escaped, control
    characters and ``hex_chars`` as ``\\Xhh..\\`` (their UTF-8 bytes)."""
    out = []
    for ch in text:
        if ch in _DELIMITERS:
            out.append(f"\\{_DELIMITERS[ch]}\\")
        elif ch in hex_chars or not ch.isprintable():
            out.append(f"\\X{ch.encode().hex().upper()}\\")
        else:
            out.append(ch)
    return "".join(out)


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
NON_STANDARD = st.one_of(
    st.from_regex(r"\\[A-DG-QU-WYZa-z.][A-Za-z0-9.\-]{0,6}\\", fullmatch=True),  # Z…, C…, M…, .br, locals
    st.sampled_from(["\\\\", "\\X\\", "\\X4\\", "\\XG1\\", "\\X414\\", "\\H\\", "\\N\\", "\\FS\\", "\\ E\\"]),
    st.from_regex(r"\\[A-Za-z0-9.\-]{0,6}", fullmatch=True),  # never closed: runs to the field's end
)


@given(TEXT, st.data())
def test_standard_escapes_round_trip(text, data):
    hex_chars = data.draw(st.text(st.sampled_from(text), max_size=5)) if text else ""
    assert unescape(escape(text, hex_chars), SEPARATORS, "\\") == text


@given(TEXT, NON_STANDARD, TEXT)
def test_any_other_sequence_is_refused(before, sequence, after):
    if not sequence[1:].endswith("\\") or sequence == "\\\\":  # an unterminated one ends the field
        after = ""
    with pytest.raises(EscapeError):
        unescape(escape(before) + sequence + escape(after), SEPARATORS, "\\")


def test_highlighting_is_dropped_in_text_fields_only():
    assert unescape("\\H\\mg/dL\\N\\", SEPARATORS, "\\", text=True) == "mg/dL"
    with pytest.raises(EscapeError, match=r"\\H\\"):
        unescape("\\H\\mg/dL\\N\\", SEPARATORS, "\\")


def test_the_message_reads_as_written():
    (result,) = parse_oru(message()).results
    assert (result.lab_id, result.subject_id, result.value, result.unit, result.result_id) == (
        "LAB1", "IGA-A-001", 2.1, "mg/dL", "R-1")


def message(*, lab: str = "LAB1", subject: str = "IGA-A-001", value: str = "2.1", unit: str = "mg/dL",
            result_id: str = "R-1") -> str:
    return "\r".join([
        f"MSH|^~\\&|LIS|{lab}|NT|STUDY|20150601||ORU^R01|MSG1|P|2.5.1",
        f"PID|1||{subject}",
        "OBR|1||FIL-1||||20150601083000+0000",
        f"OBX|1|NM|2160-0^Creatinine^LN||{value}|{unit}|||||F||||||||||{result_id}",
    ])


PRINTABLE = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp", "Cf")), min_size=1, max_size=40).filter(
    lambda text: text == text.strip() and text != '""' and text.isprintable())


@given(PRINTABLE, st.data())
def test_a_lab_id_sent_escaped_is_read_as_it_was_written(lab, data):
    hex_chars = data.draw(st.text(st.sampled_from(lab), max_size=5))
    assert parse_oru(message(lab=escape(lab, hex_chars))).lab_id == lab


@given(st.sampled_from(["subject", "value", "unit", "result_id"]), st.sampled_from([0, 1, 2]), NON_STANDARD)
def test_a_non_standard_sequence_in_a_field_read_is_refused_never_read_changed(field, at, sequence):
    sent = {"subject": "IGA-A-001", "value": "2.1", "unit": "mg/dL", "result_id": "R-1"}[field]
    if not sequence[1:].endswith("\\"):
        at = len(sent)  # never closed: at the field's end
    try:
        parsed = parse_oru(message(**{field: sent[:at] + sequence + sent[at:]}))
    except Hl7MessageError as refused:  # PID-3: the whole message
        assert (field, refused.code) == ("subject", "bad_escape")
        return
    (item,) = parsed.items
    assert not isinstance(item, IncomingResult), item
    assert item.code == "bad_escape" and field != "subject"
