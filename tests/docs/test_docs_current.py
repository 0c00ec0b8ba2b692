"""The repo's own documentation of the contract matches what the code does."""

from __future__ import annotations

from pathlib import Path

from nephrotrack.eventdocs import DOC, render

ROOT = Path(__file__).resolve().parents[2]


def test_event_catalogue_is_generated_from_the_current_models() -> None:
    assert DOC.read_text() == render(), "docs/events.md is stale: run `python -m nephrotrack.eventdocs`"


def test_repo_contract_copy_matches_the_published_contract() -> None:
    given = ROOT.parent / "shared" / "contract.md"
    if given.exists():  # beside the repo on developer and CI machines
        assert (ROOT / "docs" / "contract.md").read_text() == given.read_text()


def test_readme_first_screen_names_the_two_commands() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "make run" in first_screen and "make test" in first_screen
