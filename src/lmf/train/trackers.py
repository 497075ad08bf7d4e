"""The metric trackers of ``report_to`` (rank 0 only): TensorBoard event files, wandb, MLflow (a local file store by
default), SwanLab (``use_swanlab`` or ``report_to: swanlab``, with LLaMA-Factory's ``swanlab_*`` keys; cloud, local
or offline) and Trackio (``report_to: trackio``: a local SQLite store, or a Space with ``trackio_space_id``).
A named tracker whose package is missing stops the run before anything is loaded, with the pip line."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from lmf.extras.errors import NotAvailableError
from lmf.extras.logging import get_logger

if TYPE_CHECKING:
    from lmf.config.parser import LmfConfig

logger = get_logger(__name__)

#: LLaMA-Factory's file of the SwanLab run's public settings, in output_dir
SWANLAB_CONFIG = "swanlab_public_config.json"


#: tracker -> (import name, pip line)
TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard (or lmf[tensorboard])"),
            "wandb": ("wandb", "pip install wandb (or lmf[wandb])"),
            "mlflow": ("mlflow", "pip install mlflow-skinny (or lmf[mlflow])"),
            "swanlab": ("swanlab", "pip install swanlab (or lmf[swanlab])"),
            "trackio": ("trackio", "pip install trackio (or lmf[trackio])")}


def resolve_trackers(report_to: list, swanlab_cloud: bool = False) -> list[str]:
    """The trackers of ``report_to`` (``all``: every supported one that is installed, but SwanLab in its cloud mode
    (``swanlab_cloud``), which needs a login that a run started by "all" cannot be assumed to have); raises
    NotAvailableError with the pip line for a named one that is missing, so that a run stops before any data or
    model is loaded."""
    import importlib.util

    if "all" in report_to:
        found = [name for name, (module, _) in TRACKERS.items() if importlib.util.find_spec(module) is not None]
        if swanlab_cloud and "swanlab" in found:
            found.remove("swanlab")
            logger.info("report_to: all leaves SwanLab's cloud mode out (it needs a login): set use_swanlab, "
                        "swanlab_api_key, or swanlab_mode local / offline")
        logger.info("report_to: all -> %s", ", ".join(found) or "none installed")
        return found
    for name in report_to:
        module, pip = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise NotAvailableError(f"report_to: {name} needs the {module} package: {pip}")
    return list(report_to)


def _flat_params(config: dict) -> dict[str, str]:
    """The config as MLflow params (values as text, at most 500 characters each; None left out)."""
    return {k: str(v)[:500] for k, v in config.items() if v is not None}


class Reporter:
    """Sends logged metrics to the trackers named in ``report_to`` (rank 0 only; no-op elsewhere)."""

    def __init__(self, cfg: "LmfConfig", is_main: bool):
        self.writers: list = []
        if not is_main:
            return
        t = cfg.training
        for name in resolve_trackers(t.report_to, swanlab_cloud=swanlab_needs_login(cfg)):
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                log_dir = t.logging_dir or os.path.join(t.output_dir, "runs")
                self.writers.append(("tensorboard", SummaryWriter(log_dir=log_dir)))
            elif name == "wandb":
                import wandb

                os.makedirs(t.output_dir, exist_ok=True)
                self.writers.append(("wandb", wandb.init(name=t.run_name, config=cfg.to_dict(), dir=t.output_dir)))
            elif name == "mlflow":
                import mlflow

                if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store next to the run
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
                    mlflow.set_tracking_uri("file:" + os.path.abspath(os.path.join(t.output_dir, "mlruns")))
                run = mlflow.start_run(run_name=t.run_name)
                mlflow.log_params(_flat_params(cfg.to_dict()))
                logger.info("mlflow: run %s in %s", run.info.run_id, mlflow.get_tracking_uri())
                self.writers.append(("mlflow", mlflow))
            elif name == "swanlab":
                self.writers.append(("swanlab", _start_swanlab(cfg)))
            elif name == "trackio":
                import trackio

                trackio.init(project=t.project, name=t.run_name, config=cfg.to_dict(), space_id=t.trackio_space_id,
                             bucket_id=t.trackio_bucket_id, embed=False)
                self.writers.append(("trackio", trackio))

    def log(self, metrics: dict, step: int) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, writer in self.writers:
            if kind == "tensorboard":
                for key, value in numeric.items():
                    writer.add_scalar(f"train/{key}" if not key.startswith("eval") else key, value, step)
            elif kind == "mlflow":
                writer.log_metrics({k.replace("/", "_"): v for k, v in numeric.items()}, step=step)
            elif kind in ("swanlab", "trackio"):
                writer.log({k if k.startswith("eval") else f"train/{k}": v for k, v in numeric.items()}, step=step)
            else:
                writer.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tensorboard":
                writer.close()
            elif kind == "mlflow":
                writer.end_run()
            else:
                writer.finish()
        self.writers = []


def swanlab_needs_login(cfg: "LmfConfig") -> bool:
    """SwanLab's cloud mode without an API key in the config (``report_to: all`` leaves it out)."""
    ft = cfg.finetuning
    return ft.swanlab_mode == "cloud" and not ft.swanlab_api_key and not ft.use_swanlab


def _start_swanlab(cfg: "LmfConfig"):
    """``swanlab.init`` as LLaMA-Factory configures it (project, workspace, run name, mode, log dir; login with
    ``swanlab_api_key``, a Lark notification with ``swanlab_lark_webhook_url``); the run's public settings written to
    ``output_dir/swanlab_public_config.json`` as LLaMA-Factory does."""
    import swanlab

    ft, t = cfg.finetuning, cfg.training
    if ft.swanlab_api_key:
        swanlab.login(api_key=ft.swanlab_api_key)
    callbacks = []
    if ft.swanlab_lark_webhook_url:  # notified (in a background thread) when the run finishes
        from swanlab.plugin.notification import LarkCallback

        class _Lark(LarkCallback):
            def _get_url(self):  # SwanLab 0.10 raises for a local / offline run (no web page): notify without one
                try:
                    return super()._get_url()
                except ValueError:
                    return None

        callbacks.append(_Lark(webhook_url=ft.swanlab_lark_webhook_url, secret=ft.swanlab_lark_secret))
    try:
        run = swanlab.init(project=ft.swanlab_project, workspace=ft.swanlab_workspace,
                           experiment_name=ft.swanlab_run_name or t.run_name, mode=ft.swanlab_mode,
                           logdir=ft.swanlab_logdir, config=cfg.to_dict(), tags=["lmf"], callbacks=callbacks or None)
    except RuntimeError as exc:  # cloud mode without a login and no terminal to ask for one
        raise NotAvailableError(f"swanlab: {str(exc).splitlines()[0]}; set swanlab_api_key (or run `swanlab login`), "
                                "or swanlab_mode: local / offline") from None
    try:
        public = run.public.json()
    except Exception:  # noqa: BLE001 - older or offline runs have no public settings; LLaMA-Factory writes {} too
        public = {}
    os.makedirs(t.output_dir, exist_ok=True)
    with open(os.path.join(t.output_dir, SWANLAB_CONFIG), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(public, indent=2, default=str))
    logger.info("swanlab: project %s, mode %s%s", ft.swanlab_project, ft.swanlab_mode,
                f", logs in {ft.swanlab_logdir}" if ft.swanlab_logdir else "")
    return swanlab

