"""The rebuild benchmark measures a rebuild of something (bench/rebuild.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_child_registers_the_event_types_it_rebuilds_from() -> None:
    """Since event types are registered at each composition root, the benchmark's child process
    registered none: its rebuild skipped every message as an unknown type and timed a rebuild of
    nothing (0 patients, 0 timeline rows). A fresh process, as the child is."""
    check = (
        "from bench.rebuild import set_up_child; set_up_child()\n"
        "from contracts import CONTRACT_EVENTS\n"
        "from services.outcomes.incoming import projection_reads\n"
        "from shared.events import registry\n"
        "assert all(registry.knows(model.event_type) for model in CONTRACT_EVENTS)\n"
        "assert projection_reads('EgfrComputed')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, check=True, timeout=120)
