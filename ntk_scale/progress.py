"""One progress reporter for every long stage (gram tiles, PCG iterations, predict rows).

In a terminal a live rich bar; in a log (ray job logs, CI, a file) one plain line every
``interval_s`` seconds plus a final line at close. Every line is also logged at INFO to the
``ntk_scale.progress`` logger.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger("ntk_scale.progress")

Field = str | float | None


def format_duration(seconds: float) -> str:
    """seconds -> "3.0 s" (under 10 s), "41 s" (under a minute), "3.2 min", "1.5 h"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _number(x: float) -> str:
    """x: a count; an integral value without decimals, otherwise 3 significant digits."""
    return str(int(x)) if float(x).is_integer() else f"{x:.3g}"


def _field(name: str, value: str | float) -> str:
    """name, value: one extra column. eta_s -> "ETA <duration>"; a str as is; a number as
    "name <3 significant digits>"."""
    if name == "eta_s":
        return f"ETA {format_duration(float(value))}"
    if isinstance(value, str):
        return value
    return f"{name} {value:.3g}"


def _is_tty(stream: Any) -> bool:
    """stream: a file-like object; True when it has an isatty() that says so."""
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


class Progress:
    """Progress of one stage.

    stage: the name at the start of each line; total: the count at completion, or None when
    unknown (then no percentage); unit: what is counted ("tiles", "iterations", "rows").
    enabled: False prints and logs nothing. interval_s: seconds (of ``clock``) between plain
    lines / log records. stream: where to write (default sys.stderr); if stream.isatty() a
    live rich bar is drawn on it instead of plain lines. done: the count already done.
    clock: a function returning seconds (time.monotonic). ``bar`` is the rich Progress in a
    terminal, else None.
    """

    def __init__(
        self,
        stage: str,
        total: float | None,
        unit: str,
        *,
        enabled: bool = True,
        interval_s: float = 5.0,
        stream: Any = None,
        done: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self.enabled, self.interval_s, self.done = enabled, interval_s, float(done)
        self.stream = sys.stderr if stream is None else stream
        self.fields: dict[str, Field] = {}
        self._clock, self._closed = clock, False
        self._start = self._last = clock()
        self.bar = self._make_bar() if enabled and _is_tty(self.stream) else None

    def _make_bar(self):
        """A started rich Progress with one task (stage, bar, the rest of the line)."""
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn
        from rich.progress import Progress as RichProgress

        bar = RichProgress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=Console(file=self.stream, force_terminal=True),
        )
        self._task = bar.add_task(self.stage, total=self.total, completed=self.done, info="")
        bar.start()
        return bar

    def update(self, done: float | None = None, advance: float = 0.0, **fields: Field) -> None:
        """done: set the count (None: keep it); advance: then add this much. fields: extra
        columns after the count, in first-given order (eta_s: seconds, shown as "ETA 41 s";
        a str as is; a number as "name 1.23"; None hides the column)."""
        if done is not None:
            self.done = float(done)
        self.done += advance
        self.fields.update(fields)
        if not self.enabled or self._closed:
            return
        if self.bar is not None:
            self.bar.update(self._task, completed=self.done, info=self._body())
        if self._clock() - self._last >= self.interval_s:
            self._emit()

    def _body(self) -> str:
        """The line without the "stage: " prefix."""
        count = _number(self.done)
        if self.total is not None:
            count += f"/{_number(self.total)}"
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.done / self.total:.1f}%)"
        parts += [_field(k, v) for k, v in self.fields.items() if v is not None]
        parts.append(f"{format_duration(self._clock() - self._start)} elapsed")
        return " | ".join(parts)

    def line(self) -> str:
        """The current plain line, e.g. "gram: 12/55 tiles (21.8%) | 3.2e7 entries/s |
        ETA 41 s | 3.0 s elapsed"."""
        return f"{self.stage}: {self._body()}"

    def _emit(self) -> None:
        """Write (plain mode only) and log the current line; restart the interval."""
        text = self.line()
        if self.bar is None:
            self.stream.write(text + "\n")
            self.stream.flush()
        logger.info("%s", text)
        self._last = self._clock()

    def close(self) -> None:
        """Stop the bar and print/log the final line, once (later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self._task, completed=self.done, info=self._body())
            self.bar.stop()
        self._emit()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False


def solve_eta(
    worst_residuals: Sequence[float], tol: float, seconds_per_iteration: float, window: int = 10
) -> float | None:
    """Seconds until the worst relative residual reaches tol.

    worst_residuals: per iteration, the worst relative residual; tol: the target;
    seconds_per_iteration: wall time of one iteration; window: how many of the last points
    the least-squares slope of log10(residual) is fitted over. Counts from the last residual.
    Returns 0 when it is already <= tol; None with fewer than 3 points or a slope that is not
    negative (not decreasing).
    """
    r = np.asarray(worst_residuals, dtype=np.float64)
    if r.size and r[-1] <= tol:
        return 0.0
    if r.size < 3:
        return None
    y = np.log10(np.maximum(r[-max(window, 2) :], np.finfo(np.float64).tiny))
    x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2.0
    slope = np.dot(x, y - y[0]) / np.dot(x, x)  # shifted by y[0]: exactly 0 when flat
    if not slope < 0:
        return None
    return float((np.log10(tol) - y[-1]) / slope * seconds_per_iteration)


class SolveProgress:
    """Progress of a PCG solve, as its callback: ``solve(..., callback=SolveProgress(...))``.

    tol: the target relative residual; max_iter: the iteration cap (None/0: unknown total).
    enabled, interval_s, stream, clock: as for Progress. Each call takes a PCGState-like
    object (.iteration int, .residuals (it+1, C) relative residuals, .active (C,) bool) and
    shows the iteration, the worst residual, columns converged "k/C", seconds per iteration
    (averaged since the first call) and the ETA to tol (solve_eta).
    """

    def __init__(
        self,
        tol: float,
        max_iter: int | None,
        *,
        enabled: bool = True,
        interval_s: float = 5.0,
        stream: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.tol, self._clock = tol, clock
        self._first: tuple[float, int] | None = None
        self.progress = Progress(
            "solve", max_iter or None, "iterations", enabled=enabled,
            interval_s=interval_s, stream=stream, clock=clock,
        )  # fmt: skip

    def _seconds_per_iteration(self, iteration: int) -> float | None:
        """iteration: the current one; the mean wall time per iteration since the first call."""
        now = self._clock()
        if self._first is None:
            self._first = (now, iteration)
        t0, it0 = self._first
        return (now - t0) / (iteration - it0) if iteration > it0 else None

    def __call__(self, state: Any) -> None:
        """state: a PCGState-like object (see the class docstring)."""
        it = int(state.iteration)
        res = np.asarray(state.residuals, dtype=np.float64)
        worst = res.reshape(res.shape[0], -1).max(axis=1)
        active = np.asarray(state.active, dtype=bool).ravel()
        spi = self._seconds_per_iteration(it)
        self.progress.update(
            done=it,
            residual=f"worst residual {worst[-1]:.2e}",
            converged=f"converged {int((~active).sum())}/{active.size}",
            speed=None if spi is None else f"{spi:.3g} s/iteration",
            eta_s=None if spi is None else solve_eta(worst, self.tol, spi),
        )

    def close(self) -> None:
        """Print/log the final line (idempotent)."""
        self.progress.close()

    def __enter__(self) -> SolveProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
