"""The documentation site: the generated configuration reference is current and names every key; the MkDocs build
passes with --strict (and fails on a broken link); the README stays short and its links resolve."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from lmf.config.reference import render_reference

pytestmark = pytest.mark.version_independent  # lmf's own mechanics: not in the compatibility runs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(REPO_ROOT, "docs", "reference", "config-keys.md")
needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or
                                  importlib.util.find_spec("material") is None,
                                  reason="mkdocs-material is not installed (pip install -e '.[docs]')")


def test_the_committed_reference_is_what_the_code_generates():
    with open(REFERENCE, encoding="utf-8") as fh:
        assert fh.read() == render_reference(), "docs/reference/config-keys.md is stale: python scripts/gen_docs.py"


def test_every_config_key_appears_in_the_reference():
    from lmf.config.args import ARG_GROUPS
    from lmf.config.compat import ALIASES, VALUE_MAPPINGS
    from lmf.config.lf_keys import LF_KEYS
    from lmf.config.v1 import V1_KEYS

    page = render_reference()
    named = set(re.findall(r"^\| `([^`]+)` \|", page, flags=re.M))
    keys = {f.name for cls in ARG_GROUPS.values() for f in dataclasses.fields(cls)}
    keys |= set(LF_KEYS) | set(ALIASES) | set(VALUE_MAPPINGS) | set(V1_KEYS)
    assert not sorted(keys - named)


def test_reference_marks_unimplemented_and_no_effect_keys():
    from lmf.config.compat import NO_EFFECT, UNSUPPORTED

    page = render_reference()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", page, flags=re.M)}
    assert UNSUPPORTED or NO_EFFECT
    for key in UNSUPPORTED:
        assert "**Not implemented**" in rows[key], key
    for key in NO_EFFECT:
        assert "**No effect**" in rows[key], key


def _build(docs_root: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                           os.path.join(docs_root, "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, env=env)


@needs_mkdocs
def test_the_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    proc = _build(REPO_ROOT, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "config-keys" / "index.html").is_file()
    copy = tmp_path / "copy"
    os.makedirs(copy)
    shutil.copy(os.path.join(REPO_ROOT, "mkdocs.yml"), copy)
    shutil.copytree(os.path.join(REPO_ROOT, "docs"), copy / "docs")
    with open(copy / "docs" / "data.md", "a", encoding="utf-8") as fh:
        fh.write("\nSee [the missing page](nowhere.md).\n")
    broken = _build(str(copy), tmp_path / "b")
    assert broken.returncode != 0 and "nowhere.md" in broken.stdout + broken.stderr


def test_every_page_is_in_the_navigation():
    import yaml

    with open(os.path.join(REPO_ROOT, "mkdocs.yml"), encoding="utf-8") as fh:
        nav = yaml.safe_load(fh)["nav"]

    def pages(items):
        for item in items:
            for value in item.values():
                yield from (pages(value) if isinstance(value, list) else [value])

    listed = set(pages(nav))
    docs = os.path.join(REPO_ROOT, "docs")
    found = {os.path.relpath(os.path.join(d, f), docs) for d, _, fs in os.walk(docs) for f in fs if f.endswith(".md")}
    assert found == listed


def test_readme_is_short_and_its_links_resolve():
    path = os.path.join(REPO_ROOT, "README.md")
    assert os.path.getsize(path) <= 10 * 1024
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(REPO_ROOT, target)), target
