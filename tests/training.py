"""Loss comparisons shared by the trainer tests (tests/test_train_*.py)."""

from __future__ import annotations

import pytest

LOSSES = ("loss/clip_alt", "loss/clip_syn", "loss/contrastive", "loss/dino", "loss/patch", "loss/total")


def assert_same_losses(got: list[dict], expected: list[dict], *, rtol: float = 1e-5) -> None:
    """Same steps, losses equal up to float reduction order, and the same schedules."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected):
        for key in LOSSES:
            assert a[key] == pytest.approx(b[key], rel=rtol, abs=1e-7), (a["step"], key, a[key], b[key])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["ema_momentum"] == pytest.approx(b["ema_momentum"], rel=1e-12)


def assert_identical(got: list[dict], expected: list[dict]) -> None:
    """A resumed run against the uninterrupted reference (4 steps): every loss to 1e-6."""
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [0, 1, 2, 3]
    for a, b in zip(got, expected):
        for key in LOSSES:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
