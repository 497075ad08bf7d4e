"""Shared fixtures: tiny models built locally (session-scoped), demo data paths, thread limits."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA_DIR = os.path.join(REPO_ROOT, "examples", "data")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# preprocessing caches of the tests go to a throwaway folder, never to ~/.cache/lmf
os.environ.setdefault("LMF_CACHE", tempfile.mkdtemp(prefix="lmf-test-cache-"))
# fault injection (LMF_TEST_*, LMF_FINGERPRINT_OVERRIDE) in this process and, through sitecustomize, in every process
# a test starts (torchrun's workers too); lmf itself never reads those variables
_FAULT_SITE = os.path.join(REPO_ROOT, "src", "lmf", "testing", "site")
assert os.path.isfile(os.path.join(_FAULT_SITE, "sitecustomize.py")), f"{_FAULT_SITE}/sitecustomize.py is missing"
os.environ["PYTHONPATH"] = os.pathsep.join([_FAULT_SITE, *filter(None, [os.environ.get("PYTHONPATH")])])
from lmf.testing.faults import install as _install_fault_injection  # noqa: E402

_install_fault_injection()


def _is_multiprocess(item) -> bool:
    return item.get_closest_marker("slow") is not None and item.get_closest_marker("single_process") is None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist (``-n 2``, what scripts/test.sh runs) a multi-process test (``slow`` and not
    ``single_process``: torchrun, Ray, concurrent runs) has the machine to itself, its set-up included (module
    fixtures that train with torchrun): it takes an exclusive lock that every other test takes shared. Ranks that
    meet at every collective lose most of their time when a third process shares the two cores (measured: a 2-process
    CLI run took ~30 s beside a single-process test, ~11 s alone), so a test beside them costs more than it saves.
    A waiting multi-process test goes first (the turnstile), so a stream of short tests never starves it."""
    workerinput = getattr(item.config, "workerinput", None)  # only in a real xdist worker, never in a pytest it starts
    if workerinput is None:
        yield
        return
    import fcntl

    base = os.path.join(tempfile.gettempdir(), f"lmf-tests-{workerinput['testrunuid']}")
    turnstile = os.open(base + ".turnstile.lock", os.O_RDWR | os.O_CREAT, 0o600)
    machine = os.open(base + ".machine.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if _is_multiprocess(item) else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield
    finally:
        fcntl.flock(machine, fcntl.LOCK_UN)  # explicit: a process the test forked shares this open file
        os.close(machine)
        os.close(turnstile)


def build_once(tmp_path_factory, name: str, build) -> pathlib.Path:
    """A folder that ``build(folder)`` fills once per test run and every xdist worker then reads (an expensive
    read-only result: a reference training run, baseline losses). Under xdist it lives beside the workers' temp
    dirs and a file lock makes the others wait for the first; a build that failed is redone by the next caller."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                build(folder)
                done.touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


@pytest.fixture(scope="session")
def demo_data_dir() -> str:
    """Folder with LLaMA-Factory's demo data and dataset_info.json (copied into the repo)."""
    return DEMO_DATA_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """A tiny Qwen3-architecture model + locally trained tokenizer, saved once per session."""
    from lmf.testing.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_qwen3")
    return build_tiny_model(str(out), arch="qwen3")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer_dir) -> str:
    """Path of the session's tiny Qwen3 model (loaded through from_pretrained by the code under test)."""
    return tiny_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny Llama-architecture model + tokenizer."""
    from lmf.testing.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny_llama")
    return build_tiny_model(str(out), arch="llama")


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A temp working directory (cwd) for CLI runs."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@contextlib.contextmanager
def log_records(logger_name: str):
    """The records ``logger_name`` emits inside the block (lmf's loggers do not propagate to caplog's root)."""
    records: list = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def copy_demo_data(dst: str) -> str:
    """Copy the demo data folder to ``dst`` (tests that write files into the data dir)."""
    shutil.copytree(DEMO_DATA_DIR, dst, dirs_exist_ok=True)
    return dst
