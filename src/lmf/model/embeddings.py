"""The model's embedding rows against its tokenizer: a tokenizer with more tokens than rows (``add_tokens``,
``add_special_tokens``, ``new_special_tokens_config``, ``resize_vocab``, or stop words a template added) gets new
rows, or a refusal that names the tokens and the key.

The rows of tokens the config adds start as LLaMA-Factory main starts them (``init_special_tokens``): ``noise_init``,
the mean of the other rows plus Gaussian noise of std ``1/sqrt(hidden)``; ``desc_init``, the mean of the rows of the
token's description (``new_special_tokens_config``: a YAML of token -> description); ``desc_init_w_noise``, both.
Input and (untied) output embeddings alike; each from its own rows (LLaMA-Factory fills the output rows of
``desc_init`` from the input embeddings). Rows inside a model's spare (padded) rows are initialised too."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmf.config.parser import split_list
from lmf.extras.errors import ConfigError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)

def special_token_descriptions(path: str) -> dict[str, str]:
    """``new_special_tokens_config``: the YAML mapping of each new special token to its description."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(f"config key 'new_special_tokens_config': cannot read {path!r} ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config key 'new_special_tokens_config': {path!r} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"config key 'new_special_tokens_config': {path!r} must map each new token to its "
                          f"description, got {type(data).__name__}")
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ConfigError(f"config key 'new_special_tokens_config': {path!r}: entry {bad[0]!r} is not a token "
                          "mapped to a description string")
    return data


def configured_special_tokens(model_args) -> tuple[list[str], dict[str, str]]:
    """The special tokens the config adds and their descriptions: ``new_special_tokens_config``'s (which take the
    place of ``add_special_tokens``, as in LLaMA-Factory main), else ``add_special_tokens`` (no descriptions)."""
    if model_args.new_special_tokens_config:
        descriptions = special_token_descriptions(model_args.new_special_tokens_config)
        return list(descriptions), descriptions
    return split_list(model_args.add_special_tokens), {}


def _row_of(tokenizer, token: str):
    """The id of ``token`` when it is one token of ``tokenizer`` (never the unknown token's)."""
    row = tokenizer.convert_tokens_to_ids(token)
    return row if row is not None and tokenizer.convert_ids_to_tokens(row) == token else None


def init_new_rows(model, tokenizer, tokens: list[str], method: str, descriptions: dict[str, str]) -> None:
    """Initialise the embedding (and untied output) rows of ``tokens`` by ``method`` (the module docstring)."""
    import math

    import torch

    ids = sorted({i for i in (_row_of(tokenizer, t) for t in tokens) if i is not None})
    if not ids:
        return
    matrices = {id(m): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                if m is not None}.values()
    with torch.no_grad():
        for weight in matrices:
            keep = torch.ones(weight.shape[0], dtype=torch.bool)
            keep[ids] = False
            mean = weight[keep].float().mean(0)
            for token in tokens:
                row = _row_of(tokenizer, token)
                if row is None:
                    continue
                base = mean
                if method != "noise_init":
                    desc = [i for i in tokenizer(descriptions[token], add_special_tokens=False)["input_ids"]
                            if i not in ids and i < weight.shape[0]]
                    base = weight[desc].float().mean(0) if desc else mean
                if method != "desc_init":
                    base = base + torch.randn_like(base) / math.sqrt(weight.shape[1])
                weight[row] = base.to(weight.dtype)
    logger.info("initialised the embedding rows of %d new token(s) (%s)", len(ids), method)


def _add_mean_rows(model, size: int, tokens: list[str]) -> None:
    """Embedding (and output) rows for the stop words a template added (:meth:`Template.fix_tokenizer`), each the
    mean of the existing rows: the same at training and at inference, so an adapter trained with them (rows
    frozen, as LLaMA-Factory's LoRA leaves them without resize_vocab) meets the same rows when it is served."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
                       if m is not None}.values():
            module.weight[old:] = module.weight[:old].mean(0, keepdim=True)
    logger.warning("the template's stop words %s have no embedding rows in this model: added %d rows (the mean "
                   "embedding; resize_vocab: true trains them, as LLaMA-Factory does)", ", ".join(tokens),
                   model.get_input_embeddings().weight.shape[0] - old)


def fit_embeddings_to_tokenizer(cfg: "LmfConfig", model, tokenizer) -> None:
    """Rows for every token of ``tokenizer``: mean rows for a template's stop words, a resize when the config asks
    for new tokens (``resize_vocab``, ``add_tokens``, ``add_special_tokens``, ``new_special_tokens_config``), else a
    ConfigError."""
    if tokenizer is None:
        return
    current = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > current:
        m = cfg.model
        beyond = sorted((i, t.content) for i, t in tokenizer.added_tokens_decoder.items() if i >= current)
        names = {content for _, content in beyond}
        if names and names <= set(getattr(tokenizer, "_lmf_template_tokens", ())) and not m.resize_vocab:
            _add_mean_rows(model, len(tokenizer), sorted(names))
            return
        if not (m.resize_vocab or m.add_tokens or m.add_special_tokens or m.new_special_tokens_config):
            rows = ", ".join(f"{content} ({i})" for i, content in beyond[:5])
            raise ConfigError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings hold {current} (no row for "
                f"{rows or 'the last ids'}; a template adds its stop words when the vocabulary "
                "lacks them): set resize_vocab: true")
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
        logger.info("resized the embeddings from %d to %d tokens", current, model.get_input_embeddings().weight.shape[0])
        _init_configured_tokens(cfg, model, tokenizer)
    elif cfg.model.resize_vocab:  # new tokens inside the model's spare rows start like resized ones (LF main)
        _init_configured_tokens(cfg, model, tokenizer)


def _init_configured_tokens(cfg: "LmfConfig", model, tokenizer) -> None:
    special, descriptions = configured_special_tokens(cfg.model)
    tokens = list(dict.fromkeys(split_list(cfg.model.add_tokens) + special))
    init_new_rows(model, tokenizer, tokens, cfg.model.init_special_tokens, descriptions)
