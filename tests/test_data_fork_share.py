"""lmf.data.fork_share: a processor's tokenizer reaches forked datasets.map workers without being pickled."""

from __future__ import annotations

import pickle

import pytest

from lmf.data import fork_share
from lmf.data.processor import make_processor


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoTokenizer

    from lmf.config.parser import build_config
    from lmf.data.template import get_template

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = build_config({"model_name_or_path": tiny_model_dir, "dataset": "x", "template": "qwen", "output_dir": "/tmp/x"})
    return make_processor("sft", tok, get_template("qwen", tok), cfg.data)


def test_pickled_processor_holds_a_key_not_the_tokenizer(processor, monkeypatch):
    monkeypatch.setattr(fork_share, "_fork_workers", lambda: True)
    blob = pickle.dumps(processor)
    assert len(blob) < len(pickle.dumps(processor.tokenizer)) / 10
    again = pickle.loads(blob)
    assert again.tokenizer is processor.tokenizer  # the registered object (a forked worker's inherited copy)


def test_forked_workers_tokenize_like_the_parent(processor):
    import multiprocess

    rows = {"messages": [[{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi " * i}]
                         for i in range(8)]}
    if not fork_share._fork_workers():
        pytest.skip("multiprocess does not fork here")
    with multiprocess.get_context("fork").Pool(2) as pool:
        [remote] = pool.map(_tokenize, [pickle.dumps(processor)])
    assert remote == _tokenize(pickle.dumps(processor), rows)


def _tokenize(blob, rows=None):
    proc = pickle.loads(blob)
    rows = rows or {"messages": [[{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi " * i}]
                                 for i in range(8)]}
    return [proc.template.encode_multiturn(proc.tokenizer, m) for m in rows["messages"]]


def test_other_start_methods_pickle_the_tokenizer(processor, monkeypatch):
    monkeypatch.setattr(fork_share, "_fork_workers", lambda: False)
    blob = pickle.dumps(processor)
    assert len(blob) > len(pickle.dumps(processor.tokenizer)) / 2
    assert pickle.loads(blob).tokenizer is not processor.tokenizer


def test_an_unknown_key_is_a_clear_error(processor, monkeypatch):
    monkeypatch.setattr(fork_share, "_fork_workers", lambda: True)
    blob = pickle.dumps(processor)
    monkeypatch.setattr(fork_share, "_REGISTRY", {})
    with pytest.raises(RuntimeError, match="not inherited from its parent"):
        pickle.loads(blob)
