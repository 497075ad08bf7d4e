"""lmf.model.startup: bitsandbytes' import-time torch.compile calls wait for first use; results stay the same."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.version_independent  # torch.compile's own contract; no transformers/peft API


def test_a_deferred_compile_compiles_on_the_first_call_and_gives_the_same_result(monkeypatch):
    import torch

    from lmf.model.startup import compiles_deferred

    calls = []
    original = torch.compile

    def recording_compile(model=None, **options):
        calls.append(options)
        return original(model, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)

    def double(x):
        return x * 2

    module = torch.nn.Linear(2, 2)
    with compiles_deferred():
        deferred = torch.compile(double, backend="eager")
        decorated = torch.compile(backend="eager")(double)
        compiled_module = torch.compile(module, backend="eager")
    assert torch.compile is recording_compile  # restored when the block ends
    assert len(calls) == 1 and isinstance(compiled_module, torch.nn.Module)  # a module is compiled at once
    x = torch.arange(4.0)
    assert torch.equal(deferred(x), x * 2) and torch.equal(decorated(x), x * 2)
    assert len(calls) == 3 and deferred.__name__ == "double"
    deferred(x)
    assert len(calls) == 3  # compiled once, then reused


def test_importing_peft_after_lmf_model_leaves_the_compiler_unloaded_and_bitsandbytes_working():
    pytest.importorskip("bitsandbytes")
    code = (
        "import sys, torch\n"
        "import lmf.model, peft, bitsandbytes.functional as F\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'bitsandbytes compiled at import'\n"
        "assert torch.compile.__module__ == 'torch', torch.compile\n"
        "w = torch.randn(64, 64)\n"
        "q, state = F.quantize_4bit(w, quant_type='nf4')\n"
        "err = (F.dequantize_4bit(q, state) - w).abs().mean() / w.abs().mean()\n"
        "assert err < 0.2, float(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
