"""Personal identifiers out of what the labs service keeps of an input it did not take.

The contract publishes every refusal on ``labs.rejected`` "with its raw payload", and also says
that no names, MRNs or birth dates exist anywhere in the system. Both hold because the raw
payload is *redacted* before it is recorded (``LabResultRejected``, the rejection log, a parked
result's copy): identifiers are replaced by ``[redacted]``, everything else is kept byte for
byte, so the lab can still find the message and see what was wrong with it. A payload without
identifiers is unchanged.

What is redacted (see docs/robustness.md, "Personal identifiers"):

- HL7 v2 (any text with ``PID``/``NK1``/… segments, parseable or not): every PID field except
  PID-1 (set id) and the first component of PID-3's first repetition (the study pseudonym, when
  it is one); the whole content of NK1, GT1, IN1, IN2, IN3, PD1 and MRG (next of kin,
  guarantor, insurance, merged-patient ids) and the text of NTE comments;
- JSON (broker messages, FHIR resources), when it parses: the value of any key that names a
  person's data (``name``, ``birthDate``, ``telecom``, ``address``, ``display``, ``text``, ``mrn``,
  ``dob`` …), contained ``Patient``/``Person``/``RelatedPerson`` resources but for their type and
  id, and a ``subject_id``/``identifier.value``/``reference`` that looks like personal data;
- any text: a subject id refused as personal data wherever it appears; ``MRN`` followed by a
  number; a date labelled as a birth date (``DOB``, ``born``, ``birth…``); and, in text that is
  not valid JSON, every quoted string that looks like personal data (a name, a date, an MRN).

"Looks like personal data" is enrollment's own test for subject ids
(:func:`shared.personal_data.personal_data_kind`), so labs and enrollment agree on what a
pseudonym is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from shared.personal_data import personal_data_kind

REDACTED = "[redacted]"

_HL7_SEGMENT = re.compile(r"(?:^|(?<=[\r\n\x0b]))([A-Z][A-Z0-9]{2})([|^~\\&#!$%*+,./:;=?@_`-])([^\r\n]*)")
_WHOLE_SEGMENTS = frozenset({"NK1", "GT1", "IN1", "IN2", "IN3", "PD1", "MRG"})
_HL7_TRIGGERS = ("PID", "NTE", *_WHOLE_SEGMENTS)
"""Segments redacted: without one of these names in the text no segment needs looking at."""
_SENSITIVE_KEYS = frozenset(k.lower() for k in (
    "name", "given", "family", "prefix", "suffix", "birthDate", "birth_date", "dateOfBirth", "date_of_birth", "dob",
    "deceasedDateTime", "telecom", "phone", "email", "address", "display", "text", "div", "photo", "contact",
    "mrn", "ssn", "patient_name", "patientName", "patient", "maritalStatus", "mothersMaidenName",
))
_PERSON_RESOURCES = frozenset({"Patient", "Person", "RelatedPerson"})
_ID_KEYS = frozenset({"subject_id", "patient_id"})
"""Keys whose string value is a subject id (broker JSON): redacted when it looks personal. In
FHIR the subject is ``subject.reference`` (``Patient/<id>``) or ``subject.identifier.value``."""
_MRN = re.compile(r"(?i)(?<![A-Za-z])MRN\s*[:#.]?\s*[A-Za-z]*[-\s]?\d[\d\s-]*\d")
_LABELLED_DOB = re.compile(
    r"(?i)((?:\bDOB\b|\bborn\b|\bbirth\w*)[\"'\s:=#]*)(\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}|\d{8})")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.){0,200})"')
_KEY_FOLLOWS = re.compile(r"\s*:")
_SINGLE_QUOTED = re.compile(r"'((?:[^'\\]|\\.){1,200})'")


def looks_personal(value: str, *, loose_names: bool = True) -> bool:
    """Whether ``value`` has the shape of personal data (a name, a date, an MRN, a phone …).
    ``loose_names=False`` takes only several words for a name (``John Smith``, ``Smith, John``),
    not any lower-case word: for free text such as refusal reasons, which quote codes and units."""
    if not value:
        return False
    kind = personal_data_kind(value)
    if kind is None:
        return False
    if not loose_names and kind.startswith("a person's name"):
        return bool(re.search(r"[\s,]", value.strip()))
    return True


def redact(text: str | None, *, also: tuple[str, ...] = ()) -> str | None:
    """``text`` with personal identifiers replaced by ``[redacted]`` (``also``: literal values
    to remove wherever they appear, e.g. a subject id refused as personal data)."""
    return _redact(text, also, screen=True)


def _redact(text: str | None, also: tuple[str, ...], *, screen: bool) -> str | None:
    """:func:`redact`; ``screen`` skips the MRN and birth-date patterns when the text cannot hold
    them — every accepted broker message is checked, and running each pattern over each value
    cost more than parsing and deciding the result. Without escapes, ``MRN`` needs the letters
    ``mrn`` and a labelled birth date ``dob``/``born``/``birth`` (any case); with a backslash a
    JSON escape could spell them, so everything runs. ``screen=False`` runs everything always
    (the reference a property test holds the screened path to)."""
    if not text:
        return text
    out = text
    for value in also:
        if value and len(value) >= 3:
            out = out.replace(value, REDACTED)
    if any(s in out for s in _HL7_TRIGGERS) and _HL7_SEGMENT.search(out):
        out = _HL7_SEGMENT.sub(_redact_segment, out)
    lowered = out.lower()
    every = not screen or "\\" in out
    labels = _Labels(
        mrn=every or "mrn" in lowered,
        dob=every or "dob" in lowered or "born" in lowered or "birth" in lowered,
    )
    out = _redact_json(out, labels)
    if labels.mrn:
        out = _MRN.sub(REDACTED, out)
    if labels.dob:
        out = _LABELLED_DOB.sub(lambda m: m.group(1) + REDACTED, out)
    return out


@dataclass(frozen=True, slots=True)
class _Labels:
    """Which labelled identifiers (MRN, birth date) the text may hold, so may need looking for."""

    mrn: bool
    dob: bool


def redact_reason(reason: str | None, *, also: tuple[str, ...] = ()) -> str | None:
    """A refusal reason: :func:`redact`, and any quoted value (reasons quote the offending
    value, e.g. ``unit 'g/L'``) that looks like personal data."""
    out = redact(reason, also=also)
    if not out:
        return out
    def quoted(match: re.Match[str]) -> str:
        mark = match.group(0)[0]
        if mark == '"' and _KEY_FOLLOWS.match(match.string, match.end()):
            return match.group(0)
        return f"{mark}{REDACTED}{mark}" if looks_personal(match.group(1), loose_names=False) else match.group(0)

    return _QUOTED.sub(quoted, _SINGLE_QUOTED.sub(quoted, out))


def redact_subject(value: str | None) -> str | None:
    """A subject id: ``[redacted]`` when it looks like personal data (else unchanged)."""
    return REDACTED if value and looks_personal(value) else value


# --------------------------------------------------------------------------- HL7


def _redact_segment(match: re.Match[str]) -> str:
    name, separator, rest = match.group(1), match.group(2), match.group(3)
    if name == "MSH" or name not in ("PID", "NTE", *_WHOLE_SEGMENTS):
        return match.group(0)
    fields = rest.split(separator)
    if name in _WHOLE_SEGMENTS:
        fields = [fields[0]] + [REDACTED if f else f for f in fields[1:]]
    elif name == "NTE":
        fields = [REDACTED if (i >= 2 and f) else f for i, f in enumerate(fields)]
    else:  # PID: the fields are PID-1 … (index 0 is PID-1)
        kept = []
        for number, value in enumerate(fields, start=1):
            if number == 1 or not value:
                kept.append(value)
            elif number == 3:  # the study pseudonym; other repetitions (MRNs, national ids) go
                first, *others = value.split("~")
                components = [REDACTED if looks_personal(c) else c for c in first.split("^")]
                kept.append("~".join(["^".join(components), *(REDACTED for _ in others)]))
            else:
                kept.append(REDACTED)
        fields = kept
    return name + separator + separator.join(fields)


# --------------------------------------------------------------------------- JSON


def _redact_json(text: str, labels: _Labels) -> str:
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return text
    try:
        loaded = json.loads(text)
        changed, cleaned = _walk(loaded, labels)
        return json.dumps(cleaned, ensure_ascii=False) if changed else text
    except (ValueError, RecursionError, TypeError):
        return _QUOTED.sub(_redact_quoted, text)  # not JSON (or too odd): judge each quoted string


def _redact_quoted(match: re.Match[str]) -> str:
    """A quoted string of text that is not JSON: redacted when it is a value (not followed by
    ``:``, i.e. not an object key) that looks like personal data."""
    if _KEY_FOLLOWS.match(match.string, match.end()):
        return match.group(0)
    return f'"{REDACTED}"' if looks_personal(match.group(1)) else match.group(0)


def _walk(node: Any, labels: _Labels, key: str = "") -> tuple[bool, Any]:
    if isinstance(node, dict):
        if isinstance(node.get("resourceType"), str) and node["resourceType"] in _PERSON_RESOURCES:
            kept = {k: v for k, v in node.items() if k in ("resourceType", "id")}
            return len(kept) != len(node), kept | ({"_": REDACTED} if len(kept) != len(node) else {})
        changed = False
        out = {}
        if key == "subject":
            changed, node = _redact_subject(node)
        for name, value in node.items():
            if isinstance(name, str) and name.lower() in _SENSITIVE_KEYS and value not in (None, "", [], {}):
                out[name] = REDACTED
                changed = True
                continue
            sub_changed, out[name] = _walk(value, labels, name if isinstance(name, str) else "")
            changed |= sub_changed
        return changed, out
    if isinstance(node, list):
        changed = False
        items = []
        for item in node:
            sub_changed, cleaned = _walk(item, labels, key)
            changed |= sub_changed
            items.append(cleaned)
        return changed, items
    if isinstance(node, str):
        if key in _ID_KEYS and looks_personal(node):
            return True, REDACTED
        cleaned = _MRN.sub(REDACTED, node) if labels.mrn else node
        if labels.dob:
            cleaned = _LABELLED_DOB.sub(lambda m: m.group(1) + REDACTED, cleaned)
        return cleaned != node, cleaned
    return False, node


def _redact_subject(subject: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """A FHIR ``subject`` Reference: its ``Patient/<id>`` and ``identifier.value`` when personal."""
    out = dict(subject)
    changed = False
    reference = out.get("reference")
    if isinstance(reference, str) and looks_personal(reference.rsplit("/", 1)[-1]):
        out["reference"] = REDACTED
        changed = True
    identifier = out.get("identifier")
    if isinstance(identifier, dict) and isinstance(identifier.get("value"), str) and looks_personal(identifier["value"]):
        out["identifier"] = {**identifier, "value": REDACTED}
        changed = True
    return changed, out


def carries_personal_data(code: str | None, raw: str | None) -> bool:
    """Whether a refused input held personal identifiers (refused for it, or its raw payload
    needed redacting): the labs service then also deletes the broker's copy (services/labs/app.py)."""
    return code == "personal_identifier" or (bool(raw) and redact(raw) != raw)
