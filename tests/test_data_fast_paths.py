"""The preprocessing fast paths give exactly what the plain paths give."""

from __future__ import annotations

import datasets

from lmf.data.loader import _features
from lmf.data.normalize import write_arrow_dataset
from lmf.data.template import get_template
from lmf.testing.tiny import build_tokenizer

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


# ----------------------------------------------------------------------------- batched sft processor
def _reference_encode(tok, template, pairs, cutoff_len, train_on_prompt=False, mask_history=False):
    """The plain per-turn loop (LLaMA-Factory's supervised processor), written out independently."""
    from lmf.data.processor import IGNORE_INDEX, infer_seqlen

    eos = tok.eos_token_id
    total = sum(len(s) + len(t) for s, t in pairs)
    budget = 1 if template.efficient_eos else 0
    input_ids, labels = [], []
    for turn, (source, target) in enumerate(list(reversed(pairs)) if mask_history else pairs):
        if budget >= cutoff_len:
            break
        src_len, tgt_len = infer_seqlen(len(source), len(target), cutoff_len - budget)
        source, target = source[:src_len], target[:tgt_len]
        budget += src_len + tgt_len
        if train_on_prompt:
            source_labels = list(source)
        elif template.efficient_eos and turn != 0 and src_len:
            source_labels = [eos] + [IGNORE_INDEX] * (src_len - 1)
        else:
            source_labels = [IGNORE_INDEX] * src_len
        target_labels = [IGNORE_INDEX] * tgt_len if (mask_history and turn != 0) else list(target)
        if mask_history:
            input_ids, labels = source + target + input_ids, source_labels + target_labels + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_labels + target_labels
    if template.efficient_eos:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return input_ids, labels, len(input_ids) < total + (1 if template.efficient_eos else 0)


def _batch(n: int) -> dict:
    long_text = "A long answer that goes on and on about tokens, words and wörds. " * 6
    rows = {"_prompt": [], "_response": [], "_system": [], "_tools": []}
    for i in range(n):
        history = [{"role": "user", "content": f"Earlier q{i}"}, {"role": "assistant", "content": f"Earlier a{i}"}]
        prompt = (history if i % 3 == 0 else []) + [{"role": "user", "content": f"Question {i}: what is {i}+{i}?"}]
        answer = long_text if i % 4 == 1 else f"It is {2 * i}."
        rows["_prompt"].append(prompt)
        rows["_response"].append([{"role": "assistant", "content": answer}])
        rows["_system"].append(["", "Be brief.", "Be kind."][i % 3])
        rows["_tools"].append("")
    return rows


def test_batched_sft_processor_matches_the_per_record_loop():
    from dataclasses import replace

    from lmf.data.loader import _features
    from lmf.data.processor import SupervisedProcessor

    tok = build_tokenizer()
    batch = _batch(13)
    schema = _features("supervised").arrow_schema
    for name in ("qwen", "qwen3", "llama3", "llama2", "mistral", "alpaca", "default"):
        base = get_template(name, tok, fix_tokenizer=False)
        for template in (base, replace(base, efficient_eos=True)):
            for cutoff, opts in ((1024, {}), (1024, {"train_on_prompt": True}), (1024, {"mask_history": True}),
                                 (40, {}), (40, {"mask_history": True}), (7, {})):
                proc = SupervisedProcessor(tok, template, cutoff, **opts)
                table = proc(batch)
                assert table.schema.equals(schema), (name, table.schema)
                out = table.to_pydict()
                for i in range(len(batch["_prompt"])):
                    conv = batch["_prompt"][i] + batch["_response"][i]
                    pairs = template.encode_multiturn(tok, conv, batch["_system"][i] or None)
                    ids, labels, truncated = _reference_encode(tok, template, pairs, cutoff, **opts)
                    key = (name, template.efficient_eos, cutoff, opts, i)
                    assert out["input_ids"][i] == ids, key
                    assert out["labels"][i] == labels, key
                    assert out["attention_mask"][i] == [1] * len(ids), key
                    assert out["_truncated"][i] == truncated, key
                    assert proc.encode(batch["_prompt"][i], batch["_response"][i], batch["_system"][i], "") == \
                        (ids, labels, truncated), key


def test_encode_many_equals_encode_text_on_both_paths():
    from lmf.testing.char_tokenizer import build_char_tokenizer
    from lmf.data.template import encode_many, encode_text

    texts = ["Hello <|im_start|>user\n wörld", "", " x\t1+2 <|im_end|>", "plain"]
    for tok in (build_tokenizer(), build_char_tokenizer()):
        expected = [tok.encode(t, add_special_tokens=False) for t in texts]
        assert [encode_text(tok, t) for t in texts] == expected
        assert encode_many(tok, texts) == expected
        assert encode_many(tok, texts, parallel=True) == expected
    assert encode_many(build_tokenizer(), []) == []
