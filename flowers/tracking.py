"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator

TRACKERS = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}


def tracker_names(report_to: str) -> list[str]:
    return TRACKERS[report_to]


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return auth.authenticators(host) is not None


def prepare_wandb_mode(report_to: str) -> bool:
    """With no API key and WANDB_MODE unset, run offline instead of failing or prompting.

    Returns True when it switched to offline mode (the caller says so once, on the main process).
    """
    if "wandb" not in tracker_names(report_to) or os.environ.get("WANDB_MODE") or wandb_key_configured():
        return False
    os.environ["WANDB_MODE"] = "offline"
    return True


def start(accelerator: Accelerator, report_to: str, project: str, run_name: str, run_dir: Path,
          config: dict[str, Any]) -> None:
    names = tracker_names(report_to)
    if not names:
        return
    init_kwargs: dict[str, Any] = {}
    if "wandb" in names:
        init_kwargs["wandb"] = {"name": run_name, "dir": os.environ.get("WANDB_DIR", str(run_dir))}
    accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
