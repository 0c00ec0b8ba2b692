"""Which datasets exist, by standard and lower-case name, and how each is made from the study."""

from __future__ import annotations

from collections.abc import Callable

from services.outcomes.cdisc import adam, sdtm
from services.outcomes.cdisc.model import Dataset
from services.outcomes.cdisc.source import StudyData

Build = Callable[[StudyData], Dataset]

DATASETS: dict[str, dict[str, Build]] = {
    "sdtm": {
        "dm": lambda d: sdtm.dm(d.subjects),
        "ex": lambda d: sdtm.ex(d.subjects),
        "lb": lambda d: sdtm.lb(d.subjects, d.egfr, d.urine),
        "ae": lambda d: sdtm.ae(d.subjects, d.adverse_events),
        "ds": lambda d: sdtm.ds(d.subjects),
    },
    "adam": {
        "adsl": lambda d: adam.adsl(d.subjects),
        "adtte": lambda d: adam.adtte(d.subjects),
    },
}
