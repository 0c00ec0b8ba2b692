"""``shared.consumer.pause_after``: how long a paced consumer waits before its next fetch."""

from __future__ import annotations

from shared.consumer import pause_after


def test_a_full_batch_means_a_backlog_and_the_next_fetch_comes_at_once():
    assert pause_after(10_000, 10_000, 2.5, 1.0) == 0.0


def test_a_partial_batch_waits_as_long_as_it_took_up_to_the_limit():
    assert pause_after(1_200, 10_000, 0.4, 1.0) == 0.4
    assert pause_after(9_000, 10_000, 2.5, 1.0) == 1.0


def test_a_quick_batch_waits_next_to_nothing():
    assert pause_after(3, 10_000, 0.002, 1.0) == 0.002


def test_unpaced_consumers_never_wait():
    assert pause_after(1, 200, 0.5, 0.0) == 0.0
