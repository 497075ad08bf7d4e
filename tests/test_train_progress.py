"""Progress reporting: a bar on a terminal, plain log lines (no carriage returns) everywhere else."""

from __future__ import annotations

import io

import pytest

from lmf.train.reporting import Progress

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_gives_plain_suffixes_and_no_redraws():
    stream = io.StringIO()
    progress = Progress(total=10, initial=2, enabled=True, stream=stream)
    assert not progress.interactive and progress.bar is None
    for _ in range(3):
        progress.update(1.0, 1e-3, 100.0)
    text = progress.suffix()
    assert text.startswith("progress=5/10 eta=0:00:0"), text
    progress.close()
    assert stream.getvalue() == ""  # nothing drawn


def test_a_terminal_gets_the_bar():
    stream = FakeTerminal()
    progress = Progress(total=4, initial=0, enabled=True, stream=stream)
    assert progress.interactive and progress.bar is not None
    progress.update(2.5, 1e-4, 1000.0)
    assert progress.suffix() == ""  # the bar shows it
    progress.close()
    assert "\r" in stream.getvalue() and "loss=2.5000" in stream.getvalue()


def test_disabled_is_silent():
    progress = Progress(total=4, initial=0, enabled=False, stream=FakeTerminal())
    progress.update(1.0, 1.0, 1.0)
    assert progress.bar is None and progress.suffix() == ""
