"""Preprocessing cache: a key over everything that changes the tokens, and atomic save/load.

Key = hash of (cache format version, stage, template, tokenizer, the data arguments that matter,
the dataset registry entries, each data file's content, and for vision data where its media folder resolves
to). Media paths are stored resolved through symlinks, and an entry whose media files are gone is rebuilt. Files up to 256 MiB are hashed by
content; larger ones by size + mtime (hashing them on every start would be slow).

Location: ``preprocessing_cache_dir``, else ``$LMF_CACHE/datasets``, else ``~/.cache/lmf/datasets``.
An entry is a folder ``<key>/`` with ``train/`` (and ``eval/``) saved by ``datasets`` plus
``stats.json``; it is written in a temporary folder next to it and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Optional

from lmf.data.media import MEDIA_COLUMNS

CACHE_VERSION = "lmf-data-3"  # 2: packed rows mask the first label of every sample; 3: media rows have audios
_CONTENT_HASH_LIMIT = 256 << 20


def cache_root(data_args) -> str:
    if data_args.preprocessing_cache_dir:
        return data_args.preprocessing_cache_dir
    if os.environ.get("LMF_CACHE"):
        return os.path.join(os.environ["LMF_CACHE"], "datasets")
    return os.path.join(os.path.expanduser("~"), ".cache", "lmf", "datasets")


def file_fingerprint(path: str) -> str:
    """Content hash (or size+mtime for very large files) of one data file."""
    st = os.stat(path)
    if st.st_size > _CONTENT_HASH_LIMIT:
        return f"size={st.st_size},mtime={st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: Files a tokenizer is read from; hashing the ones in a local model folder stands for its vocabulary and merges.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "qwen.tiktoken", "tokenizer.tiktoken", "tiktoken.model")


def _backend_fingerprint(backend, source_dir: Optional[str]) -> bytes:
    """What the Rust backend tokenizes with. Serializing the whole backend (``to_str``: a 151k vocabulary with its
    merges) costs ~0.15-0.3 s per run, so for a tokenizer read from a local folder the vocabulary and merges are
    stood for by the folder's tokenizer files (hashed by content, ~15 ms) and everything that can change after
    loading is hashed from the components: normalizer, pre-tokenizer, post-processor, decoder, the model's
    settings and size, and the added tokens."""
    files = [f for f in TOKENIZER_FILES if source_dir and os.path.isfile(os.path.join(source_dir, f))]
    try:
        model = backend.model
        settings = {k: repr(getattr(model, k, None)) for k in ("dropout", "unk_token", "continuing_subword_prefix",
                                                              "end_of_word_suffix", "fuse_unk", "byte_fallback",
                                                              "ignore_merges", "max_input_chars_per_word")}
        parts = [type(model).__name__, json.dumps(settings, sort_keys=True), str(backend.get_vocab_size(with_added_tokens=False))]
        for component in (backend.normalizer, backend.pre_tokenizer, backend.post_processor, backend.decoder):
            parts.append("None" if component is None else component.__getstate__().decode("utf-8", "replace"))
        parts.append(repr(sorted((i, t.content, t.special, t.lstrip, t.rstrip, t.single_word, t.normalized)
                                 for i, t in backend.get_added_tokens_decoder().items())))
    except (AttributeError, TypeError, ValueError):  # another tokenizers version
        files = []
    if not files:
        return backend.to_str().encode()
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    for name in files:
        h.update(name.encode())
        h.update(file_fingerprint(os.path.join(source_dir, name)).encode())
    return h.hexdigest().encode()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary/merges, special tokens and chat template of ``tokenizer``."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        source = getattr(tokenizer, "name_or_path", None)
        h.update(_backend_fingerprint(backend, source if source and os.path.isdir(source) else None))
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        h.update(repr(getattr(tokenizer, attr, None)).encode())
    h.update(repr(sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))).encode())
    return h.hexdigest()


_DATA_KEYS = ("cutoff_len", "train_on_prompt", "mask_history", "max_samples", "packing", "neat_packing",
              "skip_bad_records", "mix_strategy", "interleave_probs", "eval_on_each_dataset")


def cache_key(stage: str, template, tokenizer, data_args, train_attrs: list, eval_attrs: list, seed: int,
              media=None) -> str:
    """Stable key for one preprocessing result (``media``: the vision plugin, whose image processor and image keys
    decide the vision token counts; image files are keyed by path, not content)."""
    payload: dict[str, Any] = {
        "version": CACHE_VERSION,
        "stage": stage,
        "template": template.describe(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "args": {k: getattr(data_args, k) for k in _DATA_KEYS},
        "seed": seed,
    }
    if media is not None:
        payload["media"] = media.cache_identity()
        # where media paths lead (symlinks resolved): two copies of a project sharing one data folder share entries
        payload["media_dir"] = os.path.realpath(data_args.media_dir or data_args.dataset_dir or ".")
    for split, attrs in (("train", train_attrs), ("eval", eval_attrs)):
        payload[split] = [
            {"attr": {k: v for k, v in dataclasses.asdict(a).items() if k != "files"},
             "files": [(os.path.basename(f), file_fingerprint(f)) for f in a.files]}
            for a in attrs
        ]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def missing_media(train, eval_) -> Optional[str]:
    """The first image/video path of a loaded entry that no longer exists (a project copy deleted, a shared
    folder moved), or None. Reads the path columns by Arrow, each distinct path stat'ed once."""
    import pyarrow.compute as pc

    parts = list(eval_.values()) if isinstance(eval_, dict) else [eval_]
    for ds in [train, *parts]:
        if ds is None:
            continue
        for column in MEDIA_COLUMNS:
            if column in ds.column_names:
                for path in pc.unique(pc.list_flatten(ds.data.column(column))).to_pylist():
                    if path and not os.path.exists(path):
                        return path
    return None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "stats.json")) and os.path.isdir(os.path.join(path, "train"))


def new_build_dir(target: str) -> str:
    """A fresh temporary folder next to ``target``."""
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".tmp-{os.path.basename(target)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    return path


def publish(build_dir: str, target: str, replace: bool = True) -> bool:
    """Atomically move a finished ``build_dir`` to ``target``; whether it was. ``replace``: an existing entry is moved
    aside first (overwrite_cache, tokenized_path). Without it an entry that appears meanwhile (another process,
    another node on a shared filesystem, built the same data) is kept as it is: a reader of that entry never sees
    the path vanish between the two renames, and ``build_dir`` is left to its caller."""
    if not replace:
        try:
            os.rename(build_dir, target)  # fails when target exists (a non-empty directory): atomic, no window
            return True
        except OSError:
            if is_complete(target):
                return False  # a damaged entry in the way is replaced below, as before
    old: Optional[str] = None
    if os.path.exists(target):
        old = f"{target}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(build_dir, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return True


def save_entry(build_dir: str, train, eval_, stats: dict) -> None:
    """Write datasets and stats into ``build_dir`` (stats last: it marks the entry complete)."""
    train.save_to_disk(os.path.join(build_dir, "train"))
    if isinstance(eval_, dict):  # eval_on_each_dataset: eval/<index>/ per dataset, names in eval_names.json
        names = list(eval_)
        for i, name in enumerate(names):
            eval_[name].save_to_disk(os.path.join(build_dir, "eval", str(i)))
        with open(os.path.join(build_dir, "eval", "eval_names.json"), "w", encoding="utf-8") as fh:
            json.dump(names, fh)
    elif eval_ is not None:
        eval_.save_to_disk(os.path.join(build_dir, "eval"))
    with open(os.path.join(build_dir, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(stats, fh, indent=2)


def load_entry(path: str) -> tuple[Any, Any, dict]:
    """(train, eval or None, stats) from a cache entry or a ``tokenized_path`` folder (memory-mapped)."""
    import datasets

    train = datasets.load_from_disk(os.path.join(path, "train"))
    eval_path = os.path.join(path, "eval")
    eval_ = None
    if os.path.isfile(os.path.join(eval_path, "eval_names.json")):
        with open(os.path.join(eval_path, "eval_names.json"), encoding="utf-8") as fh:
            names = json.load(fh)
        eval_ = {name: datasets.load_from_disk(os.path.join(eval_path, str(i))) for i, name in enumerate(names)}
    elif os.path.isdir(eval_path):
        eval_ = datasets.load_from_disk(eval_path)
    with open(os.path.join(path, "stats.json"), encoding="utf-8") as fh:
        stats = json.load(fh)
    return train, eval_, stats


def load_tokenized_path(path: str) -> tuple[Any, Any, dict]:
    """:func:`load_entry` of a user's ``tokenized_path`` folder, refused when its media files are gone."""
    from lmf.extras.errors import DataError

    train, eval_, stats = load_entry(path)
    gone = missing_media(train, eval_)
    if gone:
        raise DataError(f"config key 'tokenized_path': {path} refers to {gone}, which no longer exists; point "
                        "tokenized_path at a new folder to preprocess again")
    return train, eval_, stats
