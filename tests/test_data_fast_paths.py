"""The preprocessing fast paths give exactly what the plain paths give."""

from __future__ import annotations

import datasets

from lmf.data.loader import _features, write_arrow_dataset
from lmf.data.template import get_template
from lmf.model.tiny import build_tokenizer

CONV = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}]


def test_piece_cache_gives_the_same_ids_for_every_template():
    tok = build_tokenizer()
    for name in ("qwen", "llama3", "llama2", "mistral", "alpaca", "default"):
        template = get_template(name, tok, fix_tokenizer=False)
        cache: dict = {}
        for system in (None, "Be brief.", "Be brief.", ""):
            plain = template.encode_multiturn(tok, CONV, system=system)
            assert template.encode_multiturn(tok, CONV, system=system, cache=cache) == plain
            one = template.encode_oneturn(tok, CONV, system=system)
            assert template.encode_oneturn(tok, CONV, system=system, cache=cache) == one
        if template.default_system and not template.system_in_user:
            assert cache, name  # the system prompt was cached


def test_write_arrow_dataset_matches_from_generator(tmp_path):
    features = _features("normalized")
    rows = [{"_prompt": [{"role": "user", "content": f"q{i}"}], "_response": [{"role": "assistant", "content": "a"}],
             "_system": "" if i % 2 else "s", "_tools": ""} for i in range(4500)]
    ours = write_arrow_dataset(iter(rows), features, str(tmp_path / "raw" / "x.arrow"))
    reference = datasets.Dataset.from_generator(lambda: iter(rows), features=features, cache_dir=str(tmp_path / "g"))
    assert ours.features == reference.features
    assert ours.to_list() == reference.to_list()
    empty = write_arrow_dataset(iter([]), features, str(tmp_path / "raw" / "y.arrow"))
    assert len(empty) == 0 and empty.features == features
