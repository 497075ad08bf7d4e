"""Hand a map function's tokenizer to forked ``datasets.map`` workers without pickling it.

``datasets.map(num_proc=N)`` pickles the map function (dill) for every worker. A processor holding a 151k-vocabulary
fast tokenizer then serializes the whole tokenizer (its JSON, ~0.2 s) and each worker parses it back and rebuilds
lmf's word-memo encoder (~0.5 s in all): on small and mid-sized datasets the workers cost more than they save.
Workers of a *fork* pool already hold the parent's memory, so a processor registers its tokenizer when it is made
(before the pool forks; its word-memo encoder is built then too) and pickles it as the registry key; a worker finds
the parent's object in the registry it inherited, in copy-on-write pages. With another start method (spawn,
forkserver), or a processor unpickled where the key is unknown, it pickles the tokenizer as before.
"""

from __future__ import annotations

import os
import weakref

_REGISTRY: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


class _SharedRef:
    """What a pickled processor holds instead of its tokenizer: the registry key."""

    def __init__(self, key: str):
        self.key = key


def _fork_workers() -> bool:
    """Whether ``datasets``' worker pool forks this process (multiprocess's default start method here)."""
    try:
        import multiprocess
    except ImportError:
        return False
    try:
        return multiprocess.get_context().get_start_method() == "fork"
    except (RuntimeError, ValueError):
        return False


class ForkSharedTokenizer:
    """Mixin for a map function with a ``tokenizer`` attribute (see the module docstring)."""

    def share_tokenizer(self) -> None:
        """Register the tokenizer (call before the worker pool forks) and build its word-memo encoder once."""
        from lmf.data.template.encoding import prepare_fast_encoder

        prepare_fast_encoder(self.tokenizer)
        try:
            key = f"{os.getpid()}:{id(self.tokenizer)}"
            _REGISTRY[key] = self.tokenizer
            self._shared_key = key
        except TypeError:  # not weak-referenceable: pickled as before
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        key = state.pop("_shared_key", None)
        if key is not None and _REGISTRY.get(key) is self.tokenizer and _fork_workers():
            state["tokenizer"] = _SharedRef(key)
        return state

    def __setstate__(self, state):
        ref = state.get("tokenizer")
        if isinstance(ref, _SharedRef):
            tokenizer = _REGISTRY.get(ref.key)
            if tokenizer is None:
                raise RuntimeError(f"the tokenizer of a preprocessing worker was not inherited from its parent "
                                   f"({ref.key}): the worker was not forked from the process that pickled it")
            state = dict(state, tokenizer=tokenizer)
        self.__dict__.update(state)
