"""Start-up cost of the libraries models are loaded with.

bitsandbytes, which peft imports whenever it is installed, wraps four of its CPU kernels in ``torch.compile`` while
it is imported; each such call imports TorchInductor: 1.5-3 s of CPU in every process (the CLI, each torchrun
worker), although a run that quantizes nothing never calls those kernels. :func:`defer_import_time_compiles` makes
the first import of bitsandbytes hand plain functions to ``torch.compile`` on their first call instead: the same
compiled kernel where one is used, nothing paid where none is. ``torch.compile`` itself is restored as soon as that
import ends, and modules (``torch.compile(model)``) are always compiled at once, as before.

torchao, which transformers' torchao quantizer imports at its own import whenever torchao is installed (on every
``from_pretrained``), costs ~1.3 s and two log lines per process; :func:`torchao_on_demand` lets that quantizer (and
transformers' torchao integration) see torchao only once something imported it: lmf's ``fp8``, or the loader for a
checkpoint quantized with torchao.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from typing import Any

@contextlib.contextmanager
def torchao_on_demand():
    """Within the block, transformers' ``is_torchao_available`` is true only once torchao has been imported; a module
    executed here keeps that gate (its ``from ..utils import is_torchao_available``)."""
    import transformers.utils as utils
    import transformers.utils.import_utils as import_utils

    real = import_utils.is_torchao_available

    def gated(*args, **kwargs) -> bool:
        return "torchao" in sys.modules and real(*args, **kwargs)

    utils.is_torchao_available = import_utils.is_torchao_available = gated
    try:
        yield
    finally:
        utils.is_torchao_available = import_utils.is_torchao_available = real


#: module -> the context its code is executed in, the first time it is imported
DEFERRED_MODULES = {
    "bitsandbytes": "compiles_deferred",
    "transformers.quantizers.quantizer_torchao": "torchao_on_demand",
    "transformers.integrations.torchao": "torchao_on_demand",
}


def defer_import_time_compiles() -> None:
    """Install (once) the import hook for :data:`DEFERRED_MODULES` not imported yet; costs nothing until then."""
    pending = [name for name in DEFERRED_MODULES if name not in sys.modules]
    if pending and not any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferringFinder(pending))


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds the named top-level modules with the other finders and runs their code with compiles deferred."""

    def __init__(self, names: list[str]):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.names:
            return None
        self.names.discard(fullname)
        if not self.names:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _DeferringLoader(spec.loader, globals()[DEFERRED_MODULES[fullname]])
        return spec


class _DeferringLoader(importlib.abc.Loader):
    def __init__(self, loader, context):
        self._loader, self._context = loader, context

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with self._context():
            self._loader.exec_module(module)


@contextlib.contextmanager
def compiles_deferred():
    """Within the block, ``torch.compile(fn, **options)`` of a plain function returns a wrapper that compiles on its
    first call (what torch.compile does anyway, without importing the compiler now)."""
    import torch

    original = torch.compile

    def deferred(model=None, **options):
        if model is None:  # used as @torch.compile(**options)
            return lambda fn: deferred(fn, **options)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return original(model, **options)
        compiled = None

        @functools.wraps(model)
        def compile_on_first_call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = original(model, **options)
            return compiled(*args, **kwargs)

        return compile_on_first_call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = original
