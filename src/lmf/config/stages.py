"""The one registry of training stages: name, command, data layout, recipe.

Everything that depends on the stage reads it from here: the ``stage`` key's choices (:mod:`lmf.config.args`),
the commands the launcher sends to torchrun (:mod:`lmf.launcher`), the recipe a run imports
(:mod:`lmf.train.workflow`), the data pipeline and features of a dataset (:mod:`lmf.data`), and the config rules
that apply per kind of stage (:mod:`lmf.config.rules`). Adding a stage is one entry here and one recipe module
(``build_objective(cfg, inputs)``), plus its config rules, if it has any, in :mod:`lmf.config.rules`.

Stdlib only: ``lmf help`` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: Data layouts: how a record becomes a training example.
#: text: raw text, packed (pt); supervised: prompt + answer, loss on the answer (sft); pairwise: prompt + chosen +
#: rejected (dpo, rm); feedback: prompt + answer + a desirable/undesirable label (kto).
LAYOUTS = ("text", "supervised", "pairwise", "feedback")


@dataclass(frozen=True)
class StageSpec:
    """One training stage."""

    name: str  #: the ``stage`` key's value
    command: str  #: the ``lmf`` command that runs it (``lmf train`` runs any stage)
    layout: str  #: data layout, one of :data:`LAYOUTS`
    recipe: str  #: module with ``build_objective(cfg, inputs) -> Objective``
    summary: str  #: one line for help texts
    uses_reference: bool = False  #: may score against a frozen reference model (DPO, KTO)

    @property
    def token_level(self) -> bool:
        """The loss is next-token prediction over sequences (pt, sft), not a score per sequence or pair."""
        return self.layout in ("text", "supervised")


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("pt", "sft", "text", "lmf.train.sft", "continued pre-training on raw text"),
        StageSpec("sft", "sft", "supervised", "lmf.train.sft",
                  "supervised fine-tuning (`train` follows the config's `stage`; stage: pt also runs here)"),
        StageSpec("rm", "rm", "pairwise", "lmf.train.rm", "reward model (pairwise Bradley-Terry)"),
        StageSpec("dpo", "dpo", "pairwise", "lmf.train.dpo.recipe", "direct preference optimisation (sigmoid, ipo, hinge, orpo, simpo)",
                  uses_reference=True),
        StageSpec("kto", "kto", "feedback", "lmf.train.kto", "Kahneman-Tversky optimisation (answers labelled desirable / undesirable)",
                  uses_reference=True),
    )
}

#: Stages of LLaMA-Factory that lmf does not implement: name -> why (the ``stage`` key accepts and refuses them).
UNIMPLEMENTED_STAGES: dict[str, str] = {"ppo": "PPO is not implemented"}

#: Preference losses (``pref_loss``) that score without a reference model.
REFERENCE_FREE_LOSSES = ("orpo", "simpo")

#: The training commands: one per stage, and ``train`` (the config's stage).
TRAIN_COMMANDS: tuple[str, ...] = ("train", *dict.fromkeys(spec.command for spec in STAGES.values()))


def stage_spec(name: str) -> StageSpec:
    """The registry entry of stage ``name`` (KeyError for a stage lmf cannot train)."""
    return STAGES[name]


def command_stage(command: str) -> Optional[str]:
    """The stage a training command asks for (``train``: None, the config's)."""
    if command == "train":
        return None
    return next(spec.name for spec in STAGES.values() if spec.command == command and spec.name == command)


def command_runs(command: str, stage: str) -> bool:
    """Whether ``lmf <command>`` runs a config of ``stage`` (``lmf sft`` also runs pt)."""
    return command == "train" or (stage in STAGES and STAGES[stage].command == command)
