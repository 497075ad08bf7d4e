"""bench/compare_lf.py's report: a run never silently drops sections another invocation measured."""

from __future__ import annotations

import os
import sys
import types

import pytest

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
import compare_lf  # noqa: E402


def test_a_report_with_fewer_sections_goes_beside_the_old_one(tmp_path, monkeypatch):
    report = tmp_path / "RESULTS.md"
    report.write_text("# r\n\n### 5. Longest trainable context\n\nold\n\n### 7. Preprocessing\n\nold\n")
    monkeypatch.setattr(compare_lf, "render_report", lambda args, info, results: ["# r", "", "### 7. Preprocessing", "new"])
    args = types.SimpleNamespace(report=str(report), quick=False, cache=str(tmp_path), replace_report=False)
    assert compare_lf.write_report(args, {"machine": {}, "elapsed_s": 1.0}) == 3
    assert "### 5. Longest trainable context" in report.read_text()  # kept
    assert (tmp_path / "RESULTS.md.new").read_text() == "# r\n\n### 7. Preprocessing\nnew\n"
    args.replace_report = True  # said explicitly: replaced
    assert compare_lf.write_report(args, {"machine": {}, "elapsed_s": 1.0}) == 0
    assert "### 5." not in report.read_text()


def test_the_checked_in_report_has_every_measured_section():
    with open(os.path.join(REPO_ROOT, "bench", "RESULTS.md"), encoding="utf-8") as fh:
        headings = [line[4:].strip() for line in fh if line.startswith("### ")]
    for title in ("CLI start-up", "Preprocessing", "Training (CPU)", "Longest trainable context",
                  "Training speed at the real shape", "Preprocessing of real, distinct data", "Processes"):
        assert any(h.split(". ", 1)[1].startswith(title) for h in headings), (title, headings)
