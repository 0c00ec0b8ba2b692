"""The repo's own documentation of the contract matches what the code does."""

from __future__ import annotations

from pathlib import Path

from nephrotrack import metricdocs
from nephrotrack.eventdocs import DOC, render

ROOT = Path(__file__).resolve().parents[2]


def test_event_catalogue_is_generated_from_the_current_models() -> None:
    assert DOC.read_text() == render(), "docs/events.md is stale: run `python -m nephrotrack.eventdocs`"


def test_metric_catalogue_is_generated_from_the_live_registry() -> None:
    assert metricdocs.DOC.read_text() == metricdocs.render(), (
        "docs/metrics.md is stale: run `python -m nephrotrack.metricdocs`"
    )


def test_metric_catalogue_lists_what_the_operations_brief_requires() -> None:
    text = metricdocs.DOC.read_text()
    for name in (
        "nephrotrack_events_appended_total", "nephrotrack_outbox_backlog", "nephrotrack_outbox_oldest_unsent_age_seconds",
        "nephrotrack_events_published_total", "nephrotrack_publish_failures_total", "nephrotrack_messages_consumed_total",
        "nephrotrack_messages_acked_total", "nephrotrack_messages_redelivered_total",
        "nephrotrack_messages_dead_lettered_total", "nephrotrack_handler_duration_seconds",
        "nephrotrack_consumer_pending_messages", "nephrotrack_projection_lag_events",
        "nephrotrack_projection_lag_seconds", "nephrotrack_lab_results_accepted_total",
        "nephrotrack_lab_results_rejected_total", "nephrotrack_protocol_deviations_total",
        "nephrotrack_http_request_duration_seconds", "process_resident_memory_bytes", "process_cpu_seconds_total",
    ):
        assert f"| `{name}` |" in text, f"{name} missing from docs/metrics.md"


def test_repo_contract_copy_matches_the_published_contract() -> None:
    given = ROOT.parent / "shared" / "contract.md"
    if given.exists():  # beside the repo on developer and CI machines
        assert (ROOT / "docs" / "contract.md").read_text() == given.read_text()


def test_readme_first_screen_names_the_two_commands() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "make run" in first_screen and "make test" in first_screen
