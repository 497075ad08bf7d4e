"""``lmf chat``: a terminal chat that streams the reply token by token and keeps the history.

``lmf chat CONFIG.yaml`` or ``lmf chat --model PATH [--adapter PATH] [--template NAME]``, plus any
config key as an override (``temperature=0.3``, ``--max_new_tokens 256``). Reads one message per
line from stdin (a terminal or a pipe); ``clear`` forgets the history, ``exit`` (or end of input)
quits. Ctrl-C during a reply stops that reply and keeps the session. A vision-language model takes images:
``/image PATH`` attaches a local image file to the next message (its ``<image>`` placeholder goes first, as in
LLaMA-Factory's chat; a message may also place ``<image>`` itself).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Optional, TextIO

from lmf.chat.engine import MessageError

if TYPE_CHECKING:
    from lmf.chat.engine import ChatEngine

WELCOME = ("Welcome to lmf chat: type a message and press Enter; `clear` forgets the history, `exit` quits, "
           "`/image PATH` attaches an image to the next message.")
IMAGE_COMMAND = "/image"


class ChatSession:
    """A conversation with an engine: the history, and one streamed reply per user message."""

    def __init__(self, engine: "ChatEngine", system: Optional[str] = None) -> None:
        self.engine = engine
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.images: list[str] = []  # the images of the history's messages, in order
        self.pending_images: list[str] = []  # attached with /image, for the next message

    def clear(self) -> None:
        self.messages, self.images, self.pending_images = [], [], []

    def attach(self, path: str) -> None:
        """Attach an image file to the next message (checked now: MessageError if it cannot be used)."""
        from lmf.chat.engine import check_images

        path = os.path.expanduser(path.strip().strip("'\""))
        check_images(self.engine.media, [{"role": "user", "content": "<image>"}], [path])
        self.pending_images.append(path)

    def reply(self, query: str, out: TextIO, prefix: str = "") -> str:
        """Stream ``prefix`` and the answer to ``query`` into ``out``; on success both turns join the history.

        A conversation the engine rejects (e.g. too long) raises :class:`MessageError` before anything is written.
        """
        from lmf.data.media import IMAGE_PLACEHOLDER

        missing = len(self.pending_images) - query.count(IMAGE_PLACEHOLDER)
        if missing > 0:
            query = IMAGE_PLACEHOLDER * missing + query
        images = self.images + self.pending_images
        stream = self.engine.stream_chat(self.messages + [{"role": "user", "content": query}], system=self.system,
                                         images=images or None)
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
        self.images, self.pending_images = images, []
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
        if query.startswith(IMAGE_COMMAND + " ") or query == IMAGE_COMMAND:
            try:
                session.attach(query[len(IMAGE_COMMAND):])
                print(f"Image attached to the next message ({len(session.pending_images)}).", file=err, flush=True)
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
