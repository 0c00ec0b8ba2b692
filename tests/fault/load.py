"""A realistic, deterministic study load, and what it must produce — computed here, not by the
system.

:func:`make_plan` builds patients in the three groups, each with their enrollment, pulse doses,
harvest → release → infusion chains, kidney-failure events and lab results from three labs, one
per lab channel (broker JSON, HL7 over MLLP, FHIR). Lab results come as reported eGFRs and as
creatinine in mg/dL or µmol/L; some are preliminary then final, some final then corrected, a few
are deliberately invalid (they must be refused) and a few are sent twice on purpose (one
effect). Every value is known to the generator, so :func:`expected_outcome` can compute each
patient's contract values with plain arithmetic — its own CKD-EPI 2021, its own least squares —
from what was *accepted*, independently of the services' code.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

Channel = Literal["broker", "mllp", "fhir"]
LABS: tuple[tuple[str, Channel], ...] = (("LAB-NORTH", "broker"), ("LAB-SOUTH", "mllp"), ("LAB-EAST", "fhir"))
EGFR_LOINC, CREATININE_MG, CREATININE_UMOL = "98979-8", "2160-0", "14682-9"
UNITS = {EGFR_LOINC: "mL/min/1.73m2", CREATININE_MG: "mg/dL", CREATININE_UMOL: "umol/L"}
FHIR_UNITS = {EGFR_LOINC: "mL/min/{1.73_m2}", CREATININE_MG: "mg/dL", CREATININE_UMOL: "umol/L"}
RANK = {"preliminary": 0, "final": 1, "corrected": 2}
DAYS_PER_YEAR = 365.25


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class LabMessage:
    """One lab result message as one lab sends it on its channel."""

    key: str
    channel: Channel
    lab_id: str
    subject_id: str
    result_id: str
    message_id: str
    loinc: str
    value: float
    status: Literal["final", "corrected", "preliminary"]
    collected_at: datetime
    valid: bool = True
    copies: int = 1  # >1: deliberately sent again (the same message, same id)

    @property
    def unit(self) -> str:
        return UNITS.get(self.loinc, "mg/dL")

    def broker_body(self) -> bytes:
        return json.dumps({
            "message_id": self.message_id, "subject_id": self.subject_id, "lab_id": self.lab_id,
            "loinc": self.loinc, "value": self.value, "unit": self.unit,
            "collected_at": self.collected_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "status": self.status,
            "result_id": self.result_id,
        }).encode()

    def hl7(self) -> str:
        status = {"final": "F", "corrected": "C", "preliminary": "P"}[self.status]
        obx = ["OBX", "1", "NM", f"{self.loinc}^Result^LN", "", _num(self.value), self.unit, "", "", "", "",
               status, "", "", self.collected_at.strftime("%Y%m%d%H%M%S+0000"), "", "", "", "", "", "",
               self.result_id]
        return "\r".join([
            f"MSH|^~\\&|LIS|{self.lab_id}|NEPHROTRACK|STUDY|20240101120000||ORU^R01|{self.message_id}|P|2.5",
            f"PID|1||{self.subject_id}",
            f"OBR|1||ORD-{self.result_id}||||{self.collected_at.strftime('%Y%m%d%H%M%S+0000')}",
            "|".join(obx),
        ]) + "\r"

    def fhir(self) -> dict[str, Any]:
        unit = FHIR_UNITS.get(self.loinc, "mg/dL")
        return {
            "resourceType": "Observation",
            "id": self.message_id.split("/")[1],
            "meta": {"versionId": "1"},
            "status": self.status,
            "identifier": [{"system": "urn:lab:east", "value": self.result_id}],
            "code": {"coding": [{"system": "http://loinc.org", "code": self.loinc}]},
            "subject": {"reference": f"Patient/{self.subject_id}"},
            "effectiveDateTime": self.collected_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": self.value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            "performer": [{"reference": f"Organization/{self.lab_id}"}],
        }


def _num(value: float) -> str:
    return repr(float(value))


@dataclass
class PatientPlan:
    subject_id: str
    group: str
    sex: str
    age_years: int
    weight_kg: float
    enrolled_on: date
    baseline_egfr: float
    lee_grade: str
    doses: list[dict[str, Any]] = field(default_factory=list)
    harvests: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    clinical: list[dict[str, Any]] = field(default_factory=list)
    labs: list[LabMessage] = field(default_factory=list)

    @property
    def enrollment(self) -> dict[str, Any]:
        return {
            "subject_id": self.subject_id, "sex": self.sex, "age_years": self.age_years, "weight_kg": self.weight_kg,
            "group": self.group, "enrolled_on": self.enrolled_on.isoformat(), "baseline_egfr": self.baseline_egfr,
            "lee_grade": self.lee_grade,
        }

    @property
    def treatment_start(self) -> date:
        if self.group == "control":
            return self.enrolled_on
        return min(date.fromisoformat(d["given_on"]) for d in self.doses)


def make_plan(patients: int, results_per_patient: int, *, seed: int = 11, tag: str = "F") -> list[PatientPlan]:
    """``patients`` patients (groups A, B, control in turn), each with about
    ``results_per_patient`` lab messages spread over the three labs."""
    rng = random.Random(seed)
    plans = []
    for index in range(patients):
        group = ("A", "B", "control")[index % 3]
        sid = f"{tag}{'ABC'[index % 3]}-{index:04d}"
        enrolled_on = date(2012, 1, 3) + timedelta(days=13 * index)
        weight = round(rng.uniform(48, 95), 1)
        plan = PatientPlan(
            subject_id=sid, group=group, sex=rng.choice("FM"), age_years=rng.randint(19, 72), weight_kg=weight,
            enrolled_on=enrolled_on,
            baseline_egfr=round(rng.uniform(12, 44), 1) if group != "B" else round(rng.uniform(50, 110), 1),
            lee_grade={"A": "III", "B": rng.choice(["IV", "V"]), "control": "II"}[group],
        )
        start = enrolled_on + timedelta(days=14)
        if group != "control":
            for cycle in range(1, rng.randint(2, 4) + 1):
                for day in (1, 2, 3):
                    plan.doses.append({
                        "cycle": cycle, "day": day,
                        "given_on": (start + timedelta(days=28 * (cycle - 1) + day - 1)).isoformat(),
                        "dose_mg": min(1000.0, round(25 * weight)), "weight_kg": weight,
                    })
            for number in range(1, rng.randint(1, 2) + 1):
                given_on = start + timedelta(days=150 * number)
                plan.harvests.append((
                    {"harvested_on": (given_on - timedelta(days=21)).isoformat(), "fat_grams": 100 + number},
                    {"cell_count": 3.1e7, "viability_pct": 92},
                    {"given_on": given_on.isoformat(), "cell_count": 3.0e7 + number},
                ))
        else:
            start = enrolled_on
        plan.labs = _lab_messages(rng, plan, start, results_per_patient)
        last = max(m.collected_at.date() for m in plan.labs if m.valid)  # not the deliberate 2099
        fate = rng.random()
        if fate < 0.2:
            plan.clinical.append({"type": "dialysis_started", "on": (last - timedelta(days=40)).isoformat()})
        elif fate < 0.3:
            plan.clinical.append({"type": "kidney_transplant", "on": (last - timedelta(days=10)).isoformat()})
        plans.append(plan)
    return plans


def _lab_messages(rng: random.Random, plan: PatientPlan, start: date, count: int) -> list[LabMessage]:
    messages: list[LabMessage] = []
    egfr = plan.baseline_egfr
    k = 0
    while len(messages) < count:
        lab_id, channel = LABS[k % len(LABS)]
        collected = datetime.combine(start + timedelta(days=21 * k - 30), datetime.min.time(), UTC) + timedelta(
            hours=8, minutes=rng.randint(0, 59))
        egfr = min(150.0, max(6.0, egfr + rng.uniform(-3, 3.5)))
        result_id = f"{plan.subject_id}-{lab_id[-4:]}-{k:04d}"
        kind = rng.random()
        loinc = EGFR_LOINC
        value = round(egfr, 1)
        if kind < 0.10:
            loinc, value = CREATININE_MG, round(rng.uniform(0.6, 5.5), 2)
        elif kind < 0.15:
            loinc, value = CREATININE_UMOL, round(rng.uniform(50, 480), 1)

        def message(n: int, status: str, val: float, *, valid: bool = True, lo: str = loinc) -> LabMessage:
            if channel == "fhir":
                message_id = f"Observation/obs-{result_id}-{n}/_history/1"
            else:
                message_id = f"M-{result_id}-{n}"
            return LabMessage(
                key=f"lab:{result_id}:{n}", channel=channel, lab_id=lab_id, subject_id=plan.subject_id,
                result_id=result_id, message_id=message_id, loinc=lo, value=val, status=status,  # type: ignore[arg-type]
                collected_at=collected, valid=valid,
            )

        shape = rng.random()
        if shape < 0.03:  # refused: an analyte we do not take, an impossible value, a time in the future
            bad = rng.choice(["loinc", "range", "future"])
            if bad == "loinc":
                messages.append(message(0, "final", value, valid=False, lo="2345-7"))
            elif bad == "range":
                messages.append(message(0, "final", 250.0, valid=False, lo=EGFR_LOINC))
            else:
                item = message(0, "final", value, valid=False)
                messages.append(_replace(item, collected_at=datetime(2099, 1, 1, 8, tzinfo=UTC)))
        elif shape < 0.10:  # preliminary, then the final
            messages += [message(0, "preliminary", round(value * 1.05, 2)), message(1, "final", value)]
        elif shape < 0.15:  # final with a typo, then corrected
            messages += [message(0, "final", round(value * 0.5, 2)), message(1, "corrected", value)]
        elif shape < 0.17:  # a preliminary that is never followed up: kept, not counted
            messages.append(message(0, "preliminary", value))
        else:
            messages.append(message(0, "final", value))
        if rng.random() < 0.03:  # the lab sends the last message again
            messages[-1] = _replace(messages[-1], copies=2)
        k += 1
    return messages


def _replace(message: LabMessage, **changes: Any) -> LabMessage:
    from dataclasses import replace

    return replace(message, **changes)


# --------------------------------------------------------------------------- expectation


def ckd_epi_2021(creatinine_mg_dl: float, age: int, sex: str) -> float:
    """Written out again here (not imported) so the expectation does not share the code under test."""
    kappa, alpha, factor = (0.7, -0.241, 1.012) if sex == "F" else (0.9, -0.302, 1.0)
    ratio = creatinine_mg_dl / kappa
    return 142 * min(ratio, 1) ** alpha * max(ratio, 1) ** -1.2 * 0.9938**age * factor


def age_on(plan: PatientPlan, day: date) -> int:
    """Enrollment age plus whole calendar years from enrollment, truncated toward zero (a result
    collected before enrollment keeps the enrollment age unless a whole year earlier)."""
    enrolled = plan.enrolled_on

    def whole_years(a: date, b: date) -> int:  # a <= b
        return b.year - a.year - ((b.month, b.day) < (a.month, a.day))

    if day >= enrolled:
        return plan.age_years + whole_years(enrolled, day)
    return plan.age_years - whole_years(day, enrolled)


def egfr_of(plan: PatientPlan, message: LabMessage) -> float:
    if message.loinc == EGFR_LOINC:
        return message.value
    mg_dl = message.value if message.loinc == CREATININE_MG else message.value / 88.4  # KDIGO
    return ckd_epi_2021(mg_dl, age_on(plan, message.collected_at.date()), plan.sex)


@dataclass(frozen=True)
class EffectiveResult:
    result_id: str
    egfr: float
    status: str
    counted: bool
    collected_at: datetime
    messages: int  # accepted messages for this result id


def effective_results(plan: PatientPlan, accepted: set[str]) -> dict[str, EffectiveResult]:
    """Per result id, the value that must be effective: the highest-ranked accepted message
    (every result id here has at most one message per rank, so arrival order cannot matter)."""
    by_result: dict[str, list[LabMessage]] = {}
    for message in plan.labs:
        if message.valid and message.key in accepted:
            by_result.setdefault(message.result_id, []).append(message)
    effective = {}
    for result_id, messages in by_result.items():
        best = max(messages, key=lambda m: RANK[m.status])
        effective[result_id] = EffectiveResult(
            result_id, egfr_of(plan, best), best.status, best.status != "preliminary", best.collected_at, len(messages)
        )
    return effective


def _slope(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def expected_outcome(plan: PatientPlan, accepted: set[str]) -> dict[str, Any]:
    """The contract values of one patient from the accepted inputs (keys as in the ledger)."""
    doses = [d for i, d in enumerate(plan.doses) if f"dose:{plan.subject_id}:{i}" in accepted]
    if plan.group == "control":
        start: date | None = plan.enrolled_on
    else:
        start = min((date.fromisoformat(d["given_on"]) for d in doses), default=None)
    counted = sorted(
        (r for r in effective_results(plan, accepted).values() if r.counted),
        key=lambda r: (r.collected_at, r.result_id),
    )
    before = [r for r in counted if start is not None and r.collected_at.date() <= start]
    after = [r for r in counted if start is not None and r.collected_at.date() > start]
    baseline = before[-1].egfr if before else plan.baseline_egfr
    post = after[-1] if after else None
    failures = [date.fromisoformat(e["on"]) for i, e in enumerate(plan.clinical)
                if f"event:{plan.subject_id}:{i}" in accepted]
    infusions = sum(1 for i in range(len(plan.harvests)) if f"infusion:{plan.subject_id}:{i}" in accepted)
    return {
        "subject_id": plan.subject_id,
        "group": plan.group,
        "age_years": plan.age_years,
        "treatment_start": start.isoformat() if start else None,
        "baseline_egfr": baseline,
        "post_egfr": post.egfr if post else None,
        "followup_years": (post.collected_at.date() - start).days / DAYS_PER_YEAR if post and start else None,
        "egfr_slope": _slope([((r.collected_at.date() - start).days / DAYS_PER_YEAR, r.egfr) for r in after])
        if start else None,
        "kidney_failure": bool(failures),
        "pulse_cycles": len({d["cycle"] for d in doses}),
        "infusions": infusions,
        "counted_egfr_n": len(counted),
    }


COHORT_KEYS = ("mean_age", "mean_baseline_egfr", "mean_post_egfr", "mean_followup_years", "mean_egfr_slope")


def expected_cohorts(outcomes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    cohorts = {}
    for group in ("A", "B", "control"):
        members = [o for o in outcomes if o["group"] == group]
        row: dict[str, Any] = {"n": len(members), "kidney_failure_count": sum(o["kidney_failure"] for o in members)}
        for key, source in zip(COHORT_KEYS, ("age_years", "baseline_egfr", "post_egfr", "followup_years", "egfr_slope"),
                               strict=True):
            values = [float(o[source]) for o in members if o[source] is not None]
            row[key] = math.fsum(values) / len(values) if values else None
        cohorts[group] = row
    return cohorts


def close(a: float | None, b: float | None, rel: float = 1e-9) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
