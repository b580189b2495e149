"""A Weights & Biases logger that never stops a run: it goes offline by itself when W&B cannot be reached."""

from __future__ import annotations

import netrc
import os
import socket
import sys
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn


def logs_at(trainer, steps_done: int) -> bool:
    """Whether ``trainer`` writes step metrics once ``steps_done`` optimizer steps are complete (every
    ``trainer.log_every_n_steps``; every step in ``fast_dev_run`` or without a trainer).

    Step metrics are only flushed then, and each ``self.log`` call costs Python time that shows on small steps
    (docs/history.md), so training steps of both halves log only when it counts: before its optimizer step a
    module asks ``logs_at(trainer, global_step + 1)``, after it ``logs_at(trainer, global_step)``.
    """
    if trainer is None or trainer.fast_dev_run:
        return True
    every = trainer.log_every_n_steps
    return every > 0 and steps_done % every == 0


def _wandb_address() -> tuple[str, int]:
    """Host and port of ``WANDB_BASE_URL``; the port defaults by scheme, so self-hosted ``http://host:8080`` works."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        port = url.port
    except ValueError:  # a malformed port: let the connection attempt report the host as unreachable
        port = None
    return url.hostname or "api.wandb.ai", port or (80 if url.scheme == "http" else 443)


def _redact(text: str) -> str:
    """``text`` without the API key of the environment (error messages may quote requests)."""
    key = os.environ.get("WANDB_API_KEY")
    return text.replace(key, "***") if key else text


def wandb_offline_reason(timeout: float = 2.0) -> str | None:
    """Why W&B must run offline (no API key, no network, or WANDB_MODE), or ``None`` when online is possible."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE={mode}"
    host, port = _wandb_address()
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators(host) is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if not has_key:
        return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} is unreachable ({e.__class__.__name__})"
    return None


class WandbLogger(_LightningWandbLogger):
    """Lightning's :class:`~lightning.pytorch.loggers.WandbLogger` that decides online/offline by itself.

    With ``offline=None`` (default) the run logs online when an API key and the W&B host are available and offline
    otherwise, with one warning; if an online start fails anyway, it restarts offline. Offline runs can be uploaded
    later with ``wandb sync``.

    Args:
        project: W&B project.
        name: display name of the run.
        save_dir: directory of the local W&B files.
        offline: ``True``/``False`` to force a mode, ``None`` to decide automatically.
        log_model: upload checkpoints as W&B artifacts (online only).
        entity: W&B entity (user or team).
        tags: run tags.
    """

    def __init__(
        self,
        project: str = "lightning-mtl",
        name: str | None = None,
        save_dir: str = "runs",
        offline: bool | None = None,
        log_model: bool = False,
        entity: str | None = None,
        tags: list[str] | None = None,
    ) -> None:
        reason = wandb_offline_reason() if offline is None else None
        if reason is not None:
            rank_zero_warn(f"W&B logging offline: {reason}. Upload later with `wandb sync {save_dir}/wandb`.")
        go_offline = bool(offline) or reason is not None
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            name=name, save_dir=save_dir, offline=go_offline, project=project,
            log_model=log_model and not go_offline, entity=entity, tags=tags,
        )
        # Lightning passes anonymous=None, which wandb 0.31 answers with a deprecation warning on every run
        self._wandb_init.pop("anonymous", None)
        if go_offline and not sys.stderr.isatty():
            # offline into a log file: wandb's own lines (coloured with escape codes even there) only repeat the
            # warning above, which already says where the files are and how to upload them
            import wandb

            self._wandb_init["settings"] = wandb.Settings(silent=True)

    @property
    @rank_zero_experiment
    def experiment(self):
        try:
            return super().experiment
        except Exception as e:  # W&B refused the run (bad key, outage): keep training, log locally
            if self._offline:
                raise
            rank_zero_warn(f"W&B could not start online ({e.__class__.__name__}: {_redact(str(e))}); logging offline "
                           "instead.")
            # offline by argument: wandb read its environment at the failed start and ignores (with a warning)
            # the WANDB_MODE=dryrun that Lightning would export now for an offline logger
            self._log_model, self._experiment = False, None
            self._wandb_init["mode"] = "offline"
            experiment = super().experiment
            self._offline = True
            return experiment
