"""The phase report in a termination message: fits the kubelet's 4096 bytes, survives a round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftrecipe.termination import MAX_BYTES, PhaseReport, decode, encode, write_report


def test_round_trip() -> None:
    report = PhaseReport(
        ok=True, message="trained 24 steps\non 80 examples", figures={"step": 24, "loss": 1.5}
    )
    decoded = decode(encode(report))
    assert decoded == PhaseReport(ok=True, message="trained 24 steps on 80 examples", figures=report.figures)


def test_large_figures_are_dropped_largest_first_and_named() -> None:
    figures = {"small": 1, "big": "x" * 5000, "medium": "y" * 100}
    text = encode(PhaseReport(ok=True, message="done", figures=figures))
    assert len(text.encode()) <= MAX_BYTES
    data = json.loads(text)
    assert data["figures"] == {"small": 1, "medium": "y" * 100}
    assert data["truncated"] == ["big"]


def test_a_long_message_is_shortened_to_fit() -> None:
    text = encode(PhaseReport(ok=False, message="é" * 5000))
    assert len(text.encode()) <= MAX_BYTES
    decoded = decode(text)
    assert decoded is not None and not decoded.ok and decoded.message.endswith("…")


def test_plain_text_is_a_failed_report_and_empty_is_none() -> None:
    assert decode("OOMKilled: out of memory") == PhaseReport(ok=False, message="OOMKilled: out of memory")
    assert decode('{"no": "ok field"}') == PhaseReport(ok=False, message='{"no": "ok field"}')
    assert decode("") is None and decode(None) is None


def test_written_only_where_the_file_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FTRECIPE_TERMINATION_LOG", str(log))
    write_report(PhaseReport(ok=True, message="x"))
    assert not log.exists()  # outside Kubernetes nothing is created
    log.write_text("", encoding="utf-8")
    write_report(PhaseReport(ok=True, message="x", figures={"a": 1}))
    assert decode(log.read_text(encoding="utf-8")) == PhaseReport(ok=True, message="x", figures={"a": 1})
