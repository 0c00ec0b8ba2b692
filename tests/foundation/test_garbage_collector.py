"""Service processes pace CPython's cycle collector for their allocation rate (shared.service)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shared.service import GC_THRESHOLDS, tune_garbage_collector


@pytest.fixture(autouse=True)
def restore_collector() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


def test_a_service_freezes_start_up_and_collects_young_objects_every_fifty_thousand_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEPHROTRACK_GC", raising=False)
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    tune_garbage_collector()
    assert gc.get_threshold() == GC_THRESHOLDS
    assert GC_THRESHOLDS[0] >= 10_000  # the point: far fewer young collections than CPython's 700
    assert gc.get_freeze_count() > 0  # what start-up built is no longer walked


def test_nephrotrack_gc_default_keeps_cpythons_pacing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEPHROTRACK_GC", "default")
    gc.set_threshold(700, 10, 10)
    gc.unfreeze()
    tune_garbage_collector()
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
