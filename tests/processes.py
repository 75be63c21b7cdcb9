"""Subprocess helpers shared by the fault-injection tests: stop a process group, and run
``scripts/solve_driver.py`` until it is far enough along to be SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """End the process group ``proc`` leads: SIGTERM, then SIGKILL if it outlives ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def kill_solve_driver(
    args: list[str], ready: Callable[[int], bool], env: dict[str, str] | None = None
) -> int:
    """Run solve_driver.py with ``args`` (its own process group, NTK_SOLVE_SLEEP=0.1) and
    SIGKILL the group once ``ready(last iteration printed)`` holds. Returns that iteration;
    fails if the driver exits first or makes no progress in 120 s."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "solve_driver.py"), *args],
        env={**os.environ, "NTK_SOLVE_SLEEP": "0.1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    last, lines = -1, []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            assert line, f"the solve driver exited early:\n{''.join(lines)[-3000:]}"
            if line.startswith("iteration "):
                last = int(line.split()[1])
            if ready(last):
                break
        else:
            raise AssertionError("the solve driver made no progress in 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return last
