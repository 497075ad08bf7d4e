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
import xdist_scheduling  # noqa: E402
from lmf.testing.faults import install as _install_fault_injection  # noqa: E402

_install_fault_injection()


def _is_multiprocess(item) -> bool:
    return item.get_closest_marker("slow") is not None and item.get_closest_marker("single_process") is None


def pytest_configure(config):
    xdist_scheduling.name_the_ids_file(config)


def pytest_collection_modifyitems(config, items):
    xdist_scheduling.write_ids(config, items, _is_multiprocess)


def pytest_unconfigure(config):
    xdist_scheduling.remove_the_ids_file(config)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """One worker runs the multi-process tests one after another from the start, the other everything else beside
    them (tests/xdist_scheduling.py): no worker waits for the mutex below with a test in hand."""
    return xdist_scheduling.make_scheduler(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist (``-n 2``, what scripts/test.sh runs) no two ``slow`` tests (multi-process: torchrun, Ray,
    concurrent runs) run at once: each holds a mutex shared by the run's workers (its set-up included: module
    fixtures that train with torchrun), while the other worker keeps running single-process tests beside it
    (``slow`` ones marked ``single_process`` too)."""
    workerinput = getattr(item.config, "workerinput", None)  # only in a real xdist worker, never in a pytest it starts
    if workerinput is None or not _is_multiprocess(item):
        yield
        return
    import fcntl

    path = os.path.join(tempfile.gettempdir(), f"lmf-tests-{workerinput['testrunuid']}.multiprocess.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: a process the test forked shares this open file
        os.close(fd)


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
