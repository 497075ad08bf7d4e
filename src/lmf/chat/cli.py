"""``lmf chat``: a terminal chat that streams the reply token by token and keeps the history.

``lmf chat CONFIG.yaml`` or ``lmf chat --model PATH [--adapter PATH] [--template NAME]``, plus any
config key as an override (``temperature=0.3``, ``--max_new_tokens 256``). Reads one message per
line from stdin (a terminal or a pipe); ``clear`` forgets the history, ``exit`` (or end of input)
quits. Ctrl-C during a reply stops that reply and keeps the session. A multimodal model takes media files:
``/image PATH`` (``/audio PATH``) attaches a local image (audio) file to the next message (its ``<image>``
(``<audio>``) placeholder goes first, as in LLaMA-Factory's chat; a message may also place the placeholder itself).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional, TextIO

from lmf.chat.engine import MessageError
from lmf.data.media import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from lmf.chat.engine import ChatEngine

WELCOME = ("Welcome to lmf chat: type a message and press Enter; `clear` forgets the history, `exit` quits, "
           "`/image PATH` (`/audio PATH`) attaches an image (audio) file to the next message.")
#: attach commands -> the engine's keyword (and the placeholder's kind)
ATTACH_COMMANDS = {"/image": "images", "/audio": "audios"}


_PLACEHOLDERS = {"images": IMAGE_PLACEHOLDER, "audios": AUDIO_PLACEHOLDER}


class ChatSession:
    """A conversation with an engine: the history, and one streamed reply per user message."""

    def __init__(self, engine: "ChatEngine", system: Optional[str] = None) -> None:
        self.engine = engine
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.files: dict[str, list[str]] = {kind: [] for kind in ATTACH_COMMANDS.values()}  # the history's, in order
        self.pending: dict[str, list[str]] = {kind: [] for kind in ATTACH_COMMANDS.values()}  # for the next message

    def clear(self) -> None:
        self.messages = []
        for kind in ATTACH_COMMANDS.values():
            self.files[kind], self.pending[kind] = [], []

    def attach(self, path: str, kind: str = "images") -> None:
        """Attach an image (``kind`` "audios": audio) file to the next message (checked now: MessageError if it
        cannot be used)."""
        from lmf.chat.engine import check_media

        path = os.path.expanduser(path.strip().strip("'\""))
        check_media(self.engine.media, [{"role": "user", "content": _PLACEHOLDERS[kind]}], **{kind: [path]})
        self.pending[kind].append(path)

    def reply(self, query: str, out: TextIO, prefix: str = "") -> str:
        """Stream ``prefix`` and the answer to ``query`` into ``out``; on success both turns join the history.

        A conversation the engine rejects (e.g. too long) raises :class:`MessageError` before anything is written.
        """
        files = {}
        for kind, placeholder in _PLACEHOLDERS.items():
            missing = len(self.pending[kind]) - query.count(placeholder)
            if missing > 0:
                query = placeholder * missing + query
            files[kind] = self.files[kind] + self.pending[kind]
        stream = self.engine.stream_chat(self.messages + [{"role": "user", "content": query}], system=self.system,
                                         **{kind: paths or None for kind, paths in files.items()})
        out.write(prefix)
        pieces: list[str] = []
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
                pieces.append(piece)
        finally:
            stream.close()
        answer = "".join(pieces)
        self.messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        for kind in ATTACH_COMMANDS.values():
            self.files[kind], self.pending[kind] = files[kind], []
        return answer


def _read_line(inp: TextIO, out: TextIO, interactive: bool) -> Optional[str]:
    """One input line without its newline; None at end of input."""
    if interactive:
        try:
            return input("\nUser: ")
        except EOFError:
            return None
    line = inp.readline()
    return None if line == "" else line.rstrip("\r\n")


def chat_loop(engine: "ChatEngine", inp: TextIO, out: TextIO, err: TextIO, system: Optional[str] = None) -> int:
    """Run the read-reply loop until ``exit`` or end of input; returns the exit code (0)."""
    interactive = inp is sys.stdin and inp.isatty() and out.isatty()
    session = ChatSession(engine, system)
    print(WELCOME, file=err, flush=True)
    while True:
        try:
            line = _read_line(inp, out, interactive)
        except UnicodeDecodeError:
            print("lmf chat: the input is not valid UTF-8; try again", file=err, flush=True)
            continue
        if line is None:
            break
        query = line.strip()
        if not query:
            continue
        if query == "exit":
            break
        if query == "clear":
            session.clear()
            print("History has been removed.", file=out, flush=True)
            continue
        command = query.split(" ", 1)[0]
        if command in ATTACH_COMMANDS:
            kind = ATTACH_COMMANDS[command]
            try:
                session.attach(query[len(command):], kind)
                print(f"{'Image' if kind == 'images' else 'Audio'} attached to the next message "
                      f"({len(session.pending[kind])}).", file=err, flush=True)
            except MessageError as exc:
                print(f"lmf chat: {exc}", file=err, flush=True)
            continue
        try:
            session.reply(query, out, prefix="Assistant: ")
        except MessageError as exc:
            print(f"lmf chat: {exc}", file=err, flush=True)
            continue
        except KeyboardInterrupt:
            print("\n[reply interrupted]", file=out, flush=True)
            continue
        out.write("\n")
        out.flush()
    return 0


def run_chat(argv: list[str]) -> int:
    """Entry point of ``lmf chat``."""
    from lmf.chat import create_engine
    from lmf.chat.options import load_serving_config

    cfg = load_serving_config(argv)
    engine = create_engine(cfg)
    try:
        return chat_loop(engine, sys.stdin, sys.stdout, sys.stderr)
    finally:
        engine.close()
