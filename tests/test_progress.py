"""Progress reporter: plain lines at an interval of a fake clock, final line, fields, logging,
the rich bar on a TTY, solve_eta and the PCG adapter."""

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import rich.progress

from ntk_scale.progress import Progress, SolveProgress, solve_eta


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def make(total=55, **kw):
    clock, stream = FakeClock(), io.StringIO()
    kw.setdefault("interval_s", 5.0)
    return Progress("gram", total, "tiles", stream=stream, clock=clock, **kw), clock, stream


def test_lines_only_every_interval():
    p, clock, stream = make()
    for t, expected in [(1, 0), (4.9, 0), (5, 1), (7, 1), (9.9, 1), (10, 2), (30, 3)]:
        clock.t = 100 + t
        p.update(advance=1)
        assert len(lines(stream)) == expected, t
    assert lines(stream)[0] == "gram: 3/55 tiles (5.5%) | 5.0 s elapsed"
    assert lines(stream)[-1] == "gram: 7/55 tiles (12.7%) | 30 s elapsed"


def test_final_line_at_close_exactly_once():
    p, clock, stream = make()
    clock.t += 2
    p.update(done=55)
    assert lines(stream) == []
    p.close()
    p.close()
    p.update(advance=1)  # after close: nothing more
    assert lines(stream) == ["gram: 55/55 tiles (100.0%) | 2.0 s elapsed"]


def test_context_manager_closes():
    clock, stream = FakeClock(), io.StringIO()
    with Progress("predict", None, "rows", stream=stream, clock=clock) as p:
        p.update(advance=300)
    assert lines(stream) == ["predict: 300 rows | 0.0 s elapsed"]


def test_line_matches_spec_example():
    p, clock, stream = make(done=10)
    clock.t += 3.0
    p.update(advance=2, rate="3.2e7 entries/s", eta_s=41.0)
    assert p.line() == "gram: 12/55 tiles (21.8%) | 3.2e7 entries/s | ETA 41 s | 3.0 s elapsed"


@pytest.mark.parametrize(
    "eta, text",
    [(41.0, "ETA 41 s"), (3.0, "ETA 3.0 s"), (192.0, "ETA 3.2 min"), (5400, "ETA 1.5 h")],
)
def test_eta_rendered_as_duration(eta, text):
    p, _, _ = make()
    p.update(eta_s=eta)
    assert f"| {text} |" in p.line()


def test_fields_float_three_digits_order_and_none_hidden():
    p, _, _ = make(total=None)
    p.update(done=2.5, loss=0.123456, big=123456.0, eta_s=None)
    assert p.line() == "gram: 2.5 tiles | loss 0.123 | big 1.23e+05 | 0.0 s elapsed"
    p.update(eta_s=90.0, loss=0.5)  # keeps first-given order
    assert p.line() == "gram: 2.5 tiles | loss 0.5 | big 1.23e+05 | ETA 1.5 min | 0.0 s elapsed"
    assert "%" not in p.line()


def test_lines_are_logged_at_info(caplog):
    caplog.set_level(logging.INFO, logger="ntk_scale.progress")
    p, clock, stream = make()
    for _ in range(4):
        clock.t += 3
        p.update(advance=1)
    p.close()
    records = [r for r in caplog.records if r.name == "ntk_scale.progress"]
    assert [r.levelno for r in records] == [logging.INFO] * 3
    assert [r.getMessage() for r in records] == lines(stream)


def test_disabled_writes_and_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger="ntk_scale.progress")
    p, clock, stream = make(enabled=False)
    for _ in range(5):
        clock.t += 10
        p.update(advance=1, rate="x")
    p.close()
    assert stream.getvalue() == ""
    assert [r for r in caplog.records if r.name == "ntk_scale.progress"] == []
    assert p.line().startswith("gram: 5/55 tiles")  # state still kept


def test_tty_stream_uses_rich_bar(caplog):
    caplog.set_level(logging.INFO, logger="ntk_scale.progress")
    clock, stream = FakeClock(), TTYStream()
    p = Progress("gram", 55, "tiles", stream=stream, clock=clock, interval_s=5.0)
    assert isinstance(p.bar, rich.progress.Progress)
    clock.t += 6
    p.update(done=12, rate="3.2e7 entries/s")
    p.close()
    p.close()
    out = stream.getvalue()
    assert "gram" in out and "12/55 tiles (21.8%)" in out and "3.2e7 entries/s" in out
    assert "\x1b[" in out  # terminal control codes: the live bar, not plain lines
    msgs = [r.getMessage() for r in caplog.records if r.name == "ntk_scale.progress"]
    assert len(msgs) == 2 and msgs[-1] == p.line()


def test_plain_stream_has_no_bar():
    p, _, _ = make()
    assert p.bar is None


def test_solve_eta_geometric_exact():
    r = 10.0 ** (-0.5 * np.arange(6))  # last 10^-2.5; 0.5 decades per iteration
    expected = (6 - 2.5) / 0.5 * 2.0  # 7 iterations at 2 s each
    assert solve_eta(r, 1e-6, 2.0) == pytest.approx(expected, rel=1e-12)
    r20 = 10.0 ** (-0.5 * np.arange(12))  # last 10^-5.5: 1 iteration left
    assert solve_eta(r20, 1e-6, 2.0, window=4) == pytest.approx(2.0, rel=1e-12)


def test_solve_eta_uses_last_window_only():
    r = np.concatenate([np.full(10, 1.0), 10.0 ** (-1.0 - 0.5 * np.arange(5))])  # stall, then fall
    assert solve_eta(r, 1e-6, 1.0, window=5) == pytest.approx((6 - 3) / 0.5, rel=1e-12)


def test_solve_eta_none_and_zero():
    assert solve_eta([1e-2] * 8, 1e-6, 2.0) is None  # flat
    assert solve_eta([0.0123] * 13, 1e-6, 2.0) is None  # flat, not a power of ten
    assert solve_eta(10.0 ** (0.1 * np.arange(8)), 1e-6, 2.0) is None  # rising
    assert solve_eta([1.0, 0.1], 1e-6, 2.0) is None  # fewer than 3 points
    assert solve_eta([], 1e-6, 2.0) is None
    assert solve_eta([1.0, 1e-3, 1e-7], 1e-6, 2.0) == 0.0  # already below tol


def fake_states(n: int):
    """C=2: column 1 has residual 10^(1 - 0.5 k) (the worst); column 0 converges at k=2."""
    for k in range(1, n + 1):
        ks = np.arange(k + 1, dtype=np.float64)
        col0 = np.maximum(10.0 ** (-3.0 * ks), 1e-6)
        col1 = 10.0 ** (1.0 - 0.5 * ks)
        yield SimpleNamespace(
            iteration=k,
            residuals=np.stack([col0, col1], axis=1),
            active=np.array([k < 2, True]),
        )


def test_solve_progress_shows_converged_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="ntk_scale.progress")
    clock, stream = FakeClock(), io.StringIO()
    sp = SolveProgress(1e-6, 100, interval_s=5.0, stream=stream, clock=clock)
    for state in fake_states(5):
        sp(state)
        clock.t += 2.0
    clock.t -= 2.0
    sp.close()
    sp.close()
    out = lines(stream)
    # worst residual at k=5: 10^-1.5; 4.5 decades at 0.5 per iteration = 9 iterations x 2 s
    assert out[-1] == (
        "solve: 5/100 iterations (5.0%) | worst residual 3.16e-02 | converged 1/2"
        " | 2 s/iteration | ETA 18 s | 8.0 s elapsed"
    )
    assert len(out) == 2  # one interval line (at 6 s on the fake clock) and the final line
    assert [r.getMessage() for r in caplog.records if r.name == "ntk_scale.progress"] == out


def test_solve_progress_first_call_and_unknown_total():
    clock, stream = FakeClock(), io.StringIO()
    sp = SolveProgress(1e-6, None, stream=stream, clock=clock)
    sp(next(fake_states(1)))
    assert sp.progress.line() == (
        "solve: 1 iterations | worst residual 3.16e+00 | converged 0/2 | 0.0 s elapsed"
    )
    sp.close()
    assert len(lines(stream)) == 1
