"""Logger factories that need a decision Lightning's classes do not make."""

from __future__ import annotations

import logging
import netrc
import os

log = logging.getLogger(__name__)


def wandb_logged_in() -> bool:
    """True when an API key is configured (env var or `wandb login`), without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    # `wandb login` stores the key in ~/.netrc under the API host.
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(offline: bool | str = "auto", **kwargs):
    """Lightning's WandbLogger, offline unless the user is logged in (``offline='auto'``).

    Offline runs land in ``<save_dir>/wandb/offline-run-*`` and upload later
    with ``wandb sync``; no account is needed to try the project.
    """
    from lightning.pytorch.loggers import WandbLogger

    if offline == "auto":
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_logged_in()
    if offline:
        log.info("W&B runs offline (no API key found); upload later with `wandb sync`")
    tags = kwargs.pop("tags", None)
    return WandbLogger(offline=bool(offline), tags=list(tags) if tags else None, **kwargs)
