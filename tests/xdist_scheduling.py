"""How pytest-xdist hands out the suite (scripts/test.sh runs ``-n 2``): the multi-process tests (``slow`` and not
``single_process``) are one unit of work that one worker takes first and runs one after another, while the other
worker runs every other test, one at a time; then both share what is left.

xdist's own ``--dist loadgroup`` would do this from ``xdist_group`` marks, but it renames the node ids, which
pytest 9 no longer reads. Here the workers' collection writes the multi-process node ids to a file the controller
named (``LMF_TEST_MULTIPROCESS_IDS``) and the scheduler reads it when it splits the collection into units.
"""

from __future__ import annotations

import os
import tempfile

GROUP = "multiprocess"
IDS_VARIABLE = "LMF_TEST_MULTIPROCESS_IDS"


def name_the_ids_file(config) -> None:
    """In the controller of an xdist run (before the workers start, so they inherit it): where the ids will be."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    fd, path = tempfile.mkstemp(prefix="lmf-tests-", suffix=".multiprocess-ids")
    os.close(fd)
    os.environ[IDS_VARIABLE] = path


def remove_the_ids_file(config) -> None:
    path = os.environ.get(IDS_VARIABLE)
    if path and not hasattr(config, "workerinput"):
        for leftover in (path, path + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)


def write_ids(config, items, is_multiprocess) -> None:
    """In the first worker: the collected multi-process node ids, one per line (written whole, then renamed)."""
    path = os.environ.get(IDS_VARIABLE)
    workerinput = getattr(config, "workerinput", None)
    if not path or workerinput is None or workerinput.get("workerid") != "gw0":
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(item.nodeid for item in items if is_multiprocess(item)))
    os.replace(path + ".tmp", path)


def make_scheduler(config, log):
    """The controller's scheduler: xdist's load-scope scheduling with one unit for the multi-process tests and one
    per other test (units are handed out largest first). Another ``--dist`` than the default keeps xdist's own."""
    from xdist.scheduler import LoadScopeScheduling

    if config.getoption("dist") != "load" or not os.environ.get(IDS_VARIABLE):
        return None

    class MultiprocessFirst(LoadScopeScheduling):
        _ids: frozenset[str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._ids is None:
                path = os.environ.get(IDS_VARIABLE, "")
                with open(path, encoding="utf-8") as f:
                    self._ids = frozenset(f.read().splitlines())
            return GROUP if nodeid in self._ids else nodeid

    return MultiprocessFirst(config, log)
