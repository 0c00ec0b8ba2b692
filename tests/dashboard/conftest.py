"""Make a skipped browser test impossible to miss: a banner at the end of the run."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "tests/dashboard" in getattr(r, "nodeid", "")]
    if not skipped:
        return
    terminalreporter.write_sep("!", "DASHBOARD BROWSER TESTS SKIPPED", red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"{report.nodeid}: {reason}", red=True, bold=True)
    terminalreporter.write_sep("!", "the dashboard was NOT tested in a browser", red=True, bold=True)
