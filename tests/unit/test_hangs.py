"""A hung test fails by itself and the run still ends (tests/hangs.py), checked on a small
suite run by pytest in a child process with the plugin, as ``make test`` runs ours."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

HUNG = '''
import asyncio, pytest

async def wait_for_a_reply_that_never_comes():
    await asyncio.Event().wait()

cleaned_up = []

@pytest.mark.timeout(5)
async def test_hangs():
    try:
        await wait_for_a_reply_that_never_comes()
    finally:
        cleaned_up.append(True)

async def test_the_next_test_runs_and_sees_the_cleanup():
    assert cleaned_up == [True]
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
'''

LEAKS_A_THREAD = '''
import threading

def test_leaves_a_thread_running():
    threading.Thread(target=threading.Event().wait, name="never-joined").start()
'''


def run_suite(tmp_path: Path, source: str) -> tuple[subprocess.CompletedProcess[str], float]:
    (tmp_path / "test_suite.py").write_text(source)
    started = time.monotonic()
    finished = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.hangs", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto",
         "-o", "asyncio_default_fixture_loop_scope=session", "-o", "asyncio_default_test_loop_scope=session",
         "-o", "timeout=60", "--rootdir", str(tmp_path), str(tmp_path / "test_suite.py")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    return finished, time.monotonic() - started


def test_a_hung_async_test_is_cancelled_before_its_timeout_and_says_where_it_waited(tmp_path: Path) -> None:
    finished, seconds = run_suite(tmp_path, HUNG)
    assert finished.returncode == 1, finished.stdout
    assert "1 failed, 1 passed" in finished.stdout
    assert "TestHung: the test did not finish within 4 s" in finished.stdout
    assert "in wait_for_a_reply_that_never_comes" in finished.stdout  # the await it was stuck in
    assert "Timeout (>5.0s)" not in finished.stdout  # pytest-timeout never had to step in
    assert seconds < 30


def test_a_thread_left_running_does_not_hold_the_run_open(tmp_path: Path) -> None:
    finished, seconds = run_suite(tmp_path, LEAKS_A_THREAD)
    assert finished.returncode == 0, finished.stderr  # the run's own status
    assert "1 passed" in finished.stdout
    assert "would keep the interpreter from exiting" in finished.stderr
    assert "--- never-joined" in finished.stderr
    assert seconds < 30
