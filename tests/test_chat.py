"""lmf chat: the terminal loop driven through stdin (a pipe), on the tiny model."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from lmf.chat.cli import ChatSession, chat_loop
from lmf.chat.engine import ChatEngine

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_chat(args, stdin_text, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-c", "from lmf.launcher import launch; launch()", "chat", *args],
        input=stdin_text, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env,
    )


def _replies(stdout: str) -> list[str]:
    return [line[len("Assistant: "):] for line in stdout.splitlines() if line.startswith("Assistant: ")]


def test_chat_through_a_pipe_history_clear_exit(tiny_model_dir):
    args = ["--model", tiny_model_dir, "--template", "qwen", "--do_sample", "false", "--max_new_tokens", "6"]
    proc = _run_chat(args, "hello\nhello\nclear\nhello\nexit\nnever answered\n")
    assert proc.returncode == 0, proc.stderr
    replies = _replies(proc.stdout)
    assert len(replies) == 3  # `exit` stopped the loop: the last line got no answer
    assert all(r.strip() for r in replies)
    assert "History has been removed." in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines.index("History has been removed.") == 2  # after two replies
    assert replies[2] == replies[0]  # after `clear`, the same question gets the first-turn (greedy) answer
    assert "Welcome to lmf chat" in proc.stderr


def test_bad_config_is_a_one_line_error(tmp_path, capsys):
    from lmf.launcher import launch

    with pytest.raises(SystemExit) as exit_info:
        launch(["chat", "--template", "qwen"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model_name_or_path" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        launch(["chat", "--model", str(tmp_path / "nowhere"), "--template", "qwen"])
    assert exit_info.value.code != 0 and "does not exist" in capsys.readouterr().err


class RecordingWriter(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    import torch

    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    torch.set_num_threads(1)
    return create_engine(load_serving_config(["--model", tiny_model_dir, "--template", "qwen",
                                              "do_sample=false", "max_new_tokens=8"]))


class Recorder(ChatEngine):
    """Wraps a real engine and records the conversations it is asked to continue."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def stream_chat(self, messages, system=None, tools=None, **gen):
        self.seen.append([dict(m) for m in messages])
        return self.inner.stream_chat(messages, system, tools, **gen)


def test_session_streams_and_keeps_history(engine):
    recorder = Recorder(engine)
    session = ChatSession(recorder)
    out = RecordingWriter()
    first = session.reply("hello", out)
    assert len(out.writes) > 1 and "".join(out.writes) == first  # streamed piece by piece
    assert first == engine.chat([{"role": "user", "content": "hello"}]).text
    second = session.reply("tell me more", out)
    assert recorder.seen[1] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "tell me more"}]
    assert session.messages[-1] == {"role": "assistant", "content": second}
    session.clear()
    session.reply("hello", out)
    assert recorder.seen[2] == [{"role": "user", "content": "hello"}]


def test_end_of_input_quits_cleanly(engine):
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(engine, io.StringIO("hi\n\n   \n"), out, err) == 0  # blank lines skipped, no `exit`
    assert len(_replies(out.getvalue())) == 1
    assert err.getvalue().startswith("Welcome to lmf chat")


def test_loop_reports_a_too_long_conversation_and_goes_on(engine):
    saved = engine.max_positions
    limit = len(engine.encode([{"role": "user", "content": "hi"}])) + 4
    engine.max_positions = limit
    try:
        out, err = io.StringIO(), io.StringIO()
        code = chat_loop(engine, io.StringIO("hi\n" + "word " * 40 + "\nclear\nhi\n"), out, err)
    finally:
        engine.max_positions = saved
    assert code == 0
    assert f"context holds {limit}" in err.getvalue() and "clear" in err.getvalue()
    assert len(_replies(out.getvalue())) == 2  # the too-long message got an error, not a reply

