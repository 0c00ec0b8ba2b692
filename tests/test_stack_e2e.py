"""The docker-compose topology run as local processes: five services, each on its own PostgreSQL
database, over the machine's NATS JetStream — then the published cohort through it.

Mirrors docker-compose.yml (tests/deploy checks the file itself): the same services, the same
environment variables, one database per service.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nephrotrack.demo import Stack as DemoStack
from nephrotrack.demo import abstract_round, demo
from shared.settings import SERVICES
from tests.stack import ROOT, Stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("nats_client")]

SUBJECT_ID = re.compile(r"IGA-|CTRL-|[A-Z]{2,}-\d")


def test_compose_declares_exactly_the_services_this_test_runs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in SERVICES:
        environment = compose["services"][service]["environment"]
        names = environment if isinstance(environment, dict) else dict(e.split("=", 1) for e in environment)
        assert {"NATS_URL", f"DATABASE_URL_{service.upper()}", f"NEPHROTRACK_{service.upper()}_PORT"} <= set(names)


async def test_the_published_cohort_is_reproduced_through_the_whole_stack(tmp_path: Path, prefix: str) -> None:
    stack = Stack(tmp_path, prefix, SERVICES, backend="postgresql")
    try:
        await stack.start()
        evidence = await demo(DemoStack.from_env(stack.env), timeout=120)
        cohorts = {row["group"]: row for row in evidence.cohorts}
        a, b, control = cohorts["A"], cohorts["B"], cohorts["control"]
        assert (a["n"], abstract_round(a["mean_age"], 0)) == (7, "60")
        assert (abstract_round(a["mean_baseline_egfr"], 0), abstract_round(a["mean_post_egfr"], 0)) == ("28", "39")
        assert abstract_round(a["mean_followup_years"], 1) == "6.8"
        assert (b["n"], abstract_round(b["mean_age"], 0)) == (3, "25")
        assert (abstract_round(b["mean_baseline_egfr"], 0), abstract_round(b["mean_post_egfr"], 0)) == ("85", "106")
        assert abstract_round(b["mean_followup_years"], 1) == "9.3"
        assert control["n"] == 1 and control["mean_baseline_egfr"] == 33.0 and control["kidney_failure_count"] == 1
        assert a["kidney_failure_count"] == 0 and b["kidney_failure_count"] == 0
        # "no significant side-effects were noted"; "disappearance of mesangial deposits … and of IgA"
        assert a["patients_with_significant_related_ae"] == 0 and b["patients_with_significant_related_ae"] == 0
        assert a["patients_with_ae"] > 0 and b["patients_with_ae"] > 0
        assert evidence.biopsies["B"]["paired"] == evidence.biopsies["B"]["deposits_cleared"] \
            == evidence.biopsies["B"]["iga_cleared"] == 3
        assert a["mean_post_upcr"] < a["mean_baseline_upcr"] and b["mean_post_upcr"] < b["mean_baseline_upcr"]

        async with stack.client(timeout=5) as client:
            patient = (await client.get(f"{stack.url('outcomes')}/v1/patients/IGA-C-001")).json()
            assert patient["kidney_failure"] is True and patient["kidney_failure_years"] < 2
            for service in SERVICES:
                text = (await client.get(f"{stack.url(service)}/metrics")).text
                labelled = [line for line in text.splitlines() if "{" in line and not line.startswith("#")]
                leaking = [line for line in labelled if SUBJECT_ID.search(line.split("}", 1)[0])]
                assert not leaking, f"{service} puts subject ids in metric labels: {leaking[:3]}"
                assert len(labelled) < 2000, f"{service} exposes {len(labelled)} labelled series"
    finally:
        await stack.stop()
