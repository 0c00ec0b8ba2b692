"""The enrollment facts pulse and cells decide with: who the patient is, their group and the
date they were enrolled — one pure value both services' deciders take, built from what the
service learned from enrollment's events (its patient register, or a ``PatientEnrolled``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import cast

from contracts.enrollment import Group, PatientEnrolled
from shared.store.registers import EnrolledPatient


@dataclass(frozen=True)
class KnownPatient:
    """The enrollment facts a clinical decider needs, learned from ``PatientEnrolled``."""

    subject_id: str
    group: Group
    enrolled_on: date

    @classmethod
    def from_enrolled(cls, enrolled: PatientEnrolled) -> KnownPatient:
        return cls(subject_id=enrolled.subject_id, group=enrolled.group, enrolled_on=enrolled.enrolled_on)

    @classmethod
    def from_register(cls, enrolled: EnrolledPatient | None) -> KnownPatient | None:
        """The register's row (None: never enrolled, or erased) as the deciders take it."""
        if enrolled is None:
            return None
        return cls(subject_id=enrolled.subject_id, group=cast(Group, enrolled.group), enrolled_on=enrolled.enrolled_on)
