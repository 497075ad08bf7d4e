"""Writes the generated pages of the documentation site: docs/reference/config-keys.md (from src/lmf/config/).

Usage: python scripts/gen_docs.py [--check]   (--check: exit 1 when the committed page differs, write nothing)
"""

from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "src"))

from lmf.config.reference import render_reference  # noqa: E402

PAGES = {os.path.join(REPO_ROOT, "docs", "reference", "config-keys.md"): render_reference}


def main(argv: list[str]) -> int:
    stale = []
    for path, render in PAGES.items():
        text = render()
        current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(path)
        if "--check" not in argv:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
    for path in stale:
        print(f"{'stale' if '--check' in argv else 'wrote'}: {os.path.relpath(path, REPO_ROOT)}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
