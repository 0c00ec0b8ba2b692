"""The subject a refused lab input names, read as well as it still can be from its raw text.

Why: an input refused as a whole (an HL7 message with a bad MSH-10, an invalid FHIR resource,
malformed JSON) yields no result, so its refusal had no subject: stored unsealed, and not found
when the patient's data were erased — its raw text, with the subject id and the value, stayed
readable in ``GET /v1/rejections``. With the subject read here the refusal is sealed with the
patient's key and matched by their id at erasure like any other (docs/erasure.md).

Where each channel names the subject: HL7 v2 PID-3 (first repetition, first component); FHIR
``subject.reference`` ``Patient/<id>`` or ``subject.identifier.value``; the JSON of
``labs.results`` its ``subject_id``. Tolerant by design — it reads text a parser refused — it
never raises, and gives ``None`` when in doubt: only a value shaped like a study pseudonym counts
(a patient's key and erasure exist only for those), never one that looks like personal data.
"""

from __future__ import annotations

import json
import re
from typing import Any

from contracts.labs import Source
from services.labs.catalogue import SUBJECT_ID_SHAPE
from services.labs.fhir_observations import PATIENT_REFERENCE
from services.labs.hl7_msh import sniff_msh
from services.labs.redaction import looks_personal

_SEGMENT_BREAK = re.compile(r"[\r\n\x0b\x1c]+")
_JSON_SUBJECT_ID = re.compile(r'"subject_id"\s*:\s*("(?:[^"\\]|\\.){1,200}")')
_FHIR_SUBJECT = re.compile(r'"subject"\s*:\s*\{')
_FHIR_REFERENCE = re.compile(r'"reference"\s*:\s*("(?:[^"\\]|\\.){1,300}")')
_FHIR_IDENTIFIER_VALUE = re.compile(r'"identifier"\s*:\s*\{[^{}]*?"value"\s*:\s*("(?:[^"\\]|\\.){1,200}")')
_FHIR_SUBJECT_SPAN = 1000
"""Characters after ``"subject": {`` searched for its reference or identifier in malformed JSON."""


def refused_subject(source: Source, raw: str | None) -> str | None:
    """The study pseudonym ``raw`` names where ``source``'s format puts the subject, or None."""
    if not raw:
        return None
    try:
        if source == "mllp":
            found = _hl7_subject(raw)
        elif source == "fhir":
            found = _fhir_subject(raw)
        else:
            found = _json_subject(raw)
    except (ValueError, TypeError, RecursionError):  # garbage in a shape no branch foresaw
        return None
    if found is None:
        return None
    found = found.strip()
    return found if SUBJECT_ID_SHAPE.fullmatch(found) and not looks_personal(found) else None


def _hl7_subject(text: str) -> str | None:
    """PID-3's first component, with the delimiters MSH-1/MSH-2 declare (HL7's defaults
    otherwise). Escape sequences are not read: a value holding one is no pseudonym."""
    segments = [segment for segment in _SEGMENT_BREAK.split(text.strip()) if segment]
    msh = sniff_msh(segments[0]) if segments else None
    field, component, repetition = (msh.separator, msh.component, msh.repetition) if msh else ("|", "^", "~")
    for segment in segments:
        if segment.startswith("PID" + field):
            fields = segment.split(field)
            return fields[3].split(repetition, 1)[0].split(component, 1)[0] if len(fields) > 3 else None
    return None


def _fhir_subject(text: str) -> str | None:
    document = _loads(text)
    if document is not None:
        return _resource_subject(document)
    start = _FHIR_SUBJECT.search(text)  # malformed JSON: look inside the first "subject": {…}
    if start is None:
        return None
    span = text[start.end() : start.end() + _FHIR_SUBJECT_SPAN]
    reference = _FHIR_REFERENCE.search(span)
    if reference is not None:
        return _patient_id(_string(reference.group(1)))
    identifier = _FHIR_IDENTIFIER_VALUE.search(span)
    return _string(identifier.group(1)) if identifier is not None else None


def _resource_subject(document: Any) -> str | None:
    """A resource's subject, or a Bundle's first entry resource's that names one."""
    if not isinstance(document, dict):
        return None
    if document.get("resourceType") == "Bundle" and isinstance(document.get("entry"), list):
        for entry in document["entry"]:
            found = _resource_subject(entry.get("resource")) if isinstance(entry, dict) else None
            if found is not None:
                return found
        return None
    subject = document.get("subject")
    if not isinstance(subject, dict):
        return None
    if isinstance(subject.get("reference"), str):
        return _patient_id(subject["reference"])
    identifier = subject.get("identifier")
    value = identifier.get("value") if isinstance(identifier, dict) else None
    return value if isinstance(value, str) else None


def _json_subject(text: str) -> str | None:
    document = _loads(text)
    if isinstance(document, dict):
        value = document.get("subject_id")
        return value if isinstance(value, str) else None
    found = _JSON_SUBJECT_ID.search(text)  # malformed JSON: the field as far as it can be read
    return _string(found.group(1)) if found is not None else None


def _patient_id(reference: str | None) -> str | None:
    match = PATIENT_REFERENCE.fullmatch(reference) if reference else None
    return match.group(1) if match is not None else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _string(literal: str) -> str | None:
    """A JSON string literal's value (escapes read), or None when it is not one."""
    value = _loads(literal)
    return value if isinstance(value, str) else None
