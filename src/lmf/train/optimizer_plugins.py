"""LLaMA-Factory's memory-saving optimizers, each through its own package: GaLore (``galore-torch``), APOLLO
(``apollo-torch``), BAdam (``badam``), Adam-mini (``adam-mini``) and Muon (``torch.optim.Muon``).

Every one of them is returned as an :class:`OptimizerChain`: one optimizer object for the schedule and the
training loop (its ``param_groups`` are the sub-optimizers' own group dicts), with a checkpoint state of its
own (``lmf_state_dict``), since their states (GaLore projectors, BAdam's active block) are not plain
per-parameter tensors. The layerwise GaLore/APOLLO variants step each weight in a post-accumulate-grad hook,
so no full gradient is ever held; the loop then backpropagates the already normalised loss and skips
clipping (:attr:`OptimizerChain.steps_in_backward`).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Optional

from lmf.config.rules.methods import OPTIMIZER_SWITCHES
from lmf.extras.errors import ConfigError, NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    import torch

logger = get_logger(__name__)

#: config switch -> (import name, pip extra, what it is)
PACKAGES = {
    "use_galore": ("galore_torch", "galore", "GaLore"),
    "use_apollo": ("apollo_torch", "apollo", "APOLLO"),
    "use_badam": ("badam", "badam", "BAdam"),
    "use_adam_mini": ("adam_mini", "adam-mini", "Adam-mini"),
}


def special_optimizer_of(ft) -> Optional[str]:
    """The switch (``use_galore``, ...) that is on, or None."""
    flags = {"use_galore": ft.use_galore, "use_apollo": ft.use_apollo, "use_badam": ft.use_badam,
             "use_adam_mini": ft.use_adam_mini, "use_muon": ft.use_muon}
    on = [s for s in OPTIMIZER_SWITCHES if flags[s]]
    return on[0] if on else None


def require_package(switch: str) -> None:
    module, extra, name = PACKAGES[switch]
    if importlib.util.find_spec(module) is None:
        raise NotAvailableError(f"config key {switch!r}: {name} needs the {module} package: pip install 'lmf[{extra}]'")


def _chain_class():
    import torch

    class OptimizerChain(torch.optim.Optimizer):
        """Several optimizers as one: ``param_groups`` are theirs (a schedule sets their learning rates),
        ``step`` steps each (nothing when ``steps_in_backward``: the hooks did), ``lmf_state_dict`` saves each."""

        def __init__(self, optimizers: list, steps_in_backward: bool = False, extra_state=None):
            self.optimizers = list(optimizers)
            self.steps_in_backward = steps_in_backward
            self._extra_state = extra_state  # (save, load) of state outside the sub-optimizers (BAdam's block)
            params = [p for o in self.optimizers for g in o.param_groups for p in g["params"]]
            super().__init__(params, {})
            self.param_groups = [g for o in self.optimizers for g in o.param_groups]

        def step(self, closure=None):  # noqa: D102 - see the class docstring
            if not self.steps_in_backward:
                for optimizer in self.optimizers:
                    optimizer.step()

        def zero_grad(self, set_to_none: bool = True):  # noqa: D102
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=set_to_none)

        def lmf_state_dict(self) -> dict:
            extra = self._extra_state[0]() if self._extra_state else None
            return {"optimizers": [o.state_dict() for o in self.optimizers], "extra": extra}

        def lmf_load_state_dict(self, state: dict) -> None:
            if self._extra_state and state.get("extra") is not None:
                self._extra_state[1](state["extra"])
            saved = state["optimizers"]
            if len(saved) != len(self.optimizers):
                raise ConfigError(f"the checkpoint holds {len(saved)} optimizer state(s), this run has "
                                  f"{len(self.optimizers)}: the optimizer keys changed")
            for optimizer, sd in zip(self.optimizers, saved):
                optimizer.load_state_dict(sd)
            self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    return OptimizerChain


def create_special_optimizer(model: "torch.nn.Module", args, ft) -> Any:
    """The optimizer of the switch that is on (see :func:`special_optimizer_of`), as an OptimizerChain."""
    switch = special_optimizer_of(ft)
    if switch != "use_muon":
        require_package(switch)
    build = {"use_galore": _galore, "use_apollo": _apollo, "use_badam": _badam, "use_adam_mini": _adam_mini,
             "use_muon": _muon}[switch]
    return build(model, args, ft)


def _adam_kwargs(args) -> dict:
    return dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def _projected_params(model, target: str, key: str) -> list:
    """2-D weights of the ``nn.Linear`` modules named in ``target`` (``all``: every linear but the head)."""
    from torch import nn

    from lmf.config.parser import split_list
    from lmf.model.adapter import find_all_linear_modules

    targets = split_list(target)
    names = find_all_linear_modules(_hf_model(model)) if targets == ["all"] else targets
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in name for t in names):
            chosen += [p for p in module.parameters() if p.requires_grad and p.ndim == 2]
    if not chosen:
        raise ConfigError(f"config key {key!r}: {target!r} matches no trainable linear weight of the model")
    return chosen


def _low_rank(model, args, optimizer_class, target: str, key: str, group_args: dict, layerwise: bool,
              name: str, **optimizer_args):
    from lmf.train.optimizer import param_groups

    projected = _projected_params(model, target, key)
    ids = {id(p) for p in projected}
    plain = param_groups(model, args, exclude=ids)
    low_rank = {"params": projected, "lr": args.learning_rate, "weight_decay": args.weight_decay, **group_args}
    groups = plain + [low_rank]
    chain = _chain_class()
    logger.info("%s on %d weight matrices (%s), AdamW on %d other tensors%s", name, len(projected),
                ", ".join(f"{k}={v}" for k, v in group_args.items()), sum(len(g["params"]) for g in plain),
                "; layerwise: each weight steps during backward" if layerwise else "")
    if not layerwise:
        return chain([optimizer_class(groups, **_adam_kwargs(args), **optimizer_args)])
    optimizers = []
    for group in groups:
        for p in group["params"]:
            optimizer = optimizer_class([dict(group, params=[p])], **_adam_kwargs(args), **optimizer_args)
            p.register_post_accumulate_grad_hook(_step_hook(optimizer))
            optimizers.append(optimizer)
    return chain(optimizers, steps_in_backward=True)


def _step_hook(optimizer):
    def hook(param):
        if param.grad is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return hook


def _galore(model, args, ft):
    import warnings

    from galore_torch import GaLoreAdamW

    with warnings.catch_warnings():  # its "AdamW is deprecated" notice
        warnings.simplefilter("ignore", FutureWarning)
        return _low_rank(model, args, GaLoreAdamW, ft.galore_target, "galore_target",
                         dict(rank=ft.galore_rank, update_proj_gap=ft.galore_update_interval, scale=ft.galore_scale,
                              proj_type=ft.galore_proj_type), ft.galore_layerwise, "GaLore",
                         no_deprecation_warning=True)


def _apollo(model, args, ft):
    from apollo_torch import APOLLOAdamW

    return _low_rank(model, args, APOLLOAdamW, ft.apollo_target, "apollo_target",
                     dict(rank=ft.apollo_rank, proj=ft.apollo_proj, proj_type=ft.apollo_proj_type,
                          update_proj_gap=ft.apollo_update_interval, scale=ft.apollo_scale,
                          scale_type=ft.apollo_scale_type), ft.apollo_layerwise, "APOLLO",
                     scale_front=ft.apollo_scale_front)  # LF puts it in the group, where APOLLO never reads it


def _adam_mini(model, args, ft):
    from adam_mini import Adam_mini

    config = _hf_model(model).config
    heads = getattr(config, "num_attention_heads", None)
    optimizer = Adam_mini(named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
                          lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                          weight_decay=args.weight_decay, dim=config.hidden_size, n_heads=heads,
                          n_kv_heads=getattr(config, "num_key_value_heads", None) or heads, verbose=False)
    logger.info("Adam-mini: one second moment per head / row / tensor block")
    return _chain_class()([optimizer])


def _hf_model(module):
    """The transformers model inside ``module`` (the loop's loss module wraps it)."""
    while not hasattr(module, "config") and hasattr(module, "model"):
        module = module.model
    return module


def _muon(model, args, ft):
    import torch

    from lmf.train.optimizer import param_groups

    hidden = [p for n, p in model.named_parameters()
              if p.requires_grad and p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    ids = {id(p) for p in hidden}
    muon = torch.optim.Muon(hidden, lr=args.learning_rate, weight_decay=args.weight_decay, momentum=0.95,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    optimizers = [muon]
    rest = param_groups(model, args, exclude=ids, allow_empty=True)
    if rest:
        optimizers.append(torch.optim.AdamW(rest, **_adam_kwargs(args)))
    logger.info("Muon on %d hidden weight matrices, AdamW on %d other tensors", len(hidden),
                sum(len(g["params"]) for g in rest))
    return _chain_class()(optimizers)


def _badam(model, args, ft):
    import warnings

    import torch
    from badam import BlockOptimizer

    from lmf.train.optimizer import param_groups

    if ft.badam_mode == "ratio":
        raise ConfigError("config key 'badam_mode': ratio is not implemented (its sparse gradients bypass the "
                          "loop's normalisation and clipping); use badam_mode: layer")
    # BAdam builds its active groups from the base optimizer's defaults: they carry the configured weight decay
    base = torch.optim.AdamW(param_groups(model, args), **_adam_kwargs(args), weight_decay=args.weight_decay)
    named = list(model.named_parameters())
    if any(p.dtype == torch.float32 for _, p in named):
        logger.info("BAdam: the weights are float32 (no bf16/fp16 here), so its fp32 copies of the active block "
                    "add memory instead of saving it")
    with warnings.catch_warnings():  # its own warning lists every fp32 parameter by name
        warnings.simplefilter("ignore", UserWarning)
        block = BlockOptimizer(base_optimizer=base, named_parameters_list=named,
                               switch_block_every=ft.badam_switch_interval,
                               start_block=ft.badam_start_block, switch_mode=ft.badam_switch_mode,
                               verbose=ft.badam_verbose)
    logger.info("BAdam: %d blocks, %d steps each (%s), from block %s", block.block_num, ft.badam_switch_interval,
                ft.badam_switch_mode, block.block_prefix_list.index(block.active_param_prefixs[:1]) if
                block.active_param_prefixs[:1] in block.block_prefix_list else "?")

    def save() -> dict:
        active = [p for p in block.active_param_prefixs if p not in block.active_modules]
        return {"global_step": block.global_step, "active_block": block.block_prefix_list.index(active),
                "next_block": block.current_block_idx, "block_order": list(getattr(block, "block_order", [])),
                "base": block.base_optimizer.state_dict(), "lrs": [g["lr"] for g in block.param_groups]}

    def load(state: dict) -> None:
        block.current_block_idx = state["active_block"]
        block.switch_trainable_params(verbose=0)  # fp32 copies of the active block from the restored weights
        block.current_block_idx, block.block_order = state["next_block"], list(state["block_order"])
        block.global_step = state["global_step"]
        block.base_optimizer.load_state_dict(state["base"])
        for group, lr in zip(block.param_groups, state["lrs"]):  # the schedule's value at the checkpoint
            group["lr"] = lr

    class _BlockChain(_chain_class()):
        """BAdam's BlockOptimizer (it switches ``requires_grad`` between blocks) behind the chain interface."""

        switches_blocks = True

        def lmf_load_state_dict(self, state: dict) -> None:
            load(state["extra"])

        def lmf_state_dict(self) -> dict:
            return {"optimizers": [], "extra": save()}

    return _BlockChain([block])
