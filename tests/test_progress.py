"""The bar's pace: an ETA from the second step on, said once as a line (readable in logs too)."""
from __future__ import annotations

from tunesmith.train.progress import Pace, RunLog, format_duration


def test_pace_needs_two_updates_then_extrapolates() -> None:
    pace = Pace(total_steps=10)
    assert pace.eta(1, now=100.0) is None
    assert pace.eta(3, now=104.0) == 14.0  # 2 s per step, 7 steps left


def test_format_duration() -> None:
    assert [format_duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


def test_speed_and_eta_said_once_after_the_second_step(tmp_path, capsys) -> None:
    log = RunLog(tmp_path, total_steps=20, show_bar=False)
    try:
        for step in (1, 2, 3):
            log.advance(step, 0.1 * step, 2.0, 1e-3, 900.0)
    finally:
        log.close()
    err = capsys.readouterr().err
    assert err.count("speed: 900 tokens/s; about ") == 1 and "for the remaining 18 steps" in err
