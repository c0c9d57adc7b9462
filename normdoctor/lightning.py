"""PyTorch Lightning: :class:`NormDoctorCallback` runs :func:`normdoctor.monitor` during ``fit``.

Needs the ``lightning`` extra (``pip install 'normdoctor[lightning]'``); importing this module
without ``pytorch_lightning`` (or ``lightning``) raises an ``ImportError`` that says so, and
``import normdoctor`` never imports it.

The callback watches the LightningModule (or the network named by ``module``) through the
monitor's hooks; each closed window's per-layer numbers go to the trainer's loggers
(``normdoctor/<layer>/drift`` and so on, at the trainer's global step); a harmful verdict warns
once per cause; at the end of ``fit`` the report is written, atomically and never over an
existing file (:func:`write_new`), as JSON and, if asked, as the HTML drift report.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .monitor import Flag, HistoryPoint, Monitor
from .outputs import OutputExistsError, write_atomic
from .report import ScanReport

try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - the unified package ships the same API
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "normdoctor.lightning needs PyTorch Lightning: pip install 'normdoctor[lightning]'"
        ) from exc

__all__ = ["NormDoctorCallback", "metrics_of", "write_new"]


def metrics_of(point: HistoryPoint) -> dict[str, float]:
    """A window's numbers as logger metrics (missing values left out)."""
    out: dict[str, float] = {}
    for key in ("agreement", "rel_divergence", "acc_train", "acc_eval"):
        value = getattr(point, key)
        if value is not None:
            out[f"normdoctor/{key}"] = float(value)
    out["normdoctor/harmful"] = float(point.status.harmful)
    for layer in point.layers:
        for key in ("drift", "shift", "noise", "noniid"):
            value = getattr(layer, key)
            if value is not None:
                out[f"normdoctor/{layer.name}/{key}"] = float(value)
    return out


class NormDoctorCallback(pl.Callback):  # type: ignore[misc]
    """Watch norm layers while Lightning trains; write the report at the end of ``fit``.

    Args:
        every: steps between eval-mode checks of a training batch (see :func:`monitor`).
        window: steps per verdict (default ``20 * every``).
        module: the network whose forward is one training step: an attribute path of the
            LightningModule ("net", "model.backbone") or a module; default the LightningModule
            itself (its ``forward`` must then be what ``training_step`` calls).
        json_path: write the final report's JSON there (never over an existing file).
        html_dir: write the HTML drift report into this folder (never over existing files).
        on_flag: called with each :class:`~normdoctor.monitor.Flag`.
        kwargs: passed to :class:`~normdoctor.monitor.Monitor` (thresholds, ``warmup``, ...).

    After ``fit``: ``callback.report`` is the final :class:`ScanReport`, ``callback.monitor``
    the monitor (its ``history``, ``flags``, ``figure()``).
    """

    def __init__(
        self,
        *,
        every: int = 50,
        window: int | None = None,
        module: str | nn.Module | None = None,
        json_path: str | Path | None = None,
        html_dir: str | Path | None = None,
        on_flag: Callable[[Flag], object] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.every = every
        self.window = window
        self.module = module
        self.json_path = json_path
        self.html_dir = html_dir
        self.on_flag = on_flag
        self.kwargs = kwargs
        self.monitor: Monitor | None = None
        self.report: ScanReport | None = None
        self.written: list[Path] = []
        self._logged = 0
        self._active = False

    def _target(self, pl_module: nn.Module) -> nn.Module:
        if isinstance(self.module, nn.Module):
            return self.module
        target = pl_module
        for part in (self.module or "").split("."):
            if part:
                target = getattr(target, part)
        if not isinstance(target, nn.Module):
            raise TypeError(f"module {self.module!r} is not an nn.Module")
        return target

    # -- Lightning hooks -------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.monitor = Monitor(
            self._target(pl_module),
            every=self.every,
            window=self.window,
            on_flag=self.on_flag,
            **self.kwargs,
        )
        self.monitor.__enter__()
        self._active = True
        self._logged = 0

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mon = self.monitor
        if mon is None:
            return
        mon.observe(None, _labels(batch))  # labels make the comparison accuracy or loss
        # The history holds at most ``history`` windows: count what was logged by step.
        new = [p for p in mon.history if p.step > self._logged]
        for point in new:
            self._log(trainer, metrics_of(point))
            self._logged = point.step

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        mon = self.monitor
        if mon is None:
            return
        self._close()
        self.report = report = mon.report()
        if self.json_path is not None:
            self.written.append(write_new(self.json_path, report.to_json() + "\n"))
        if self.html_dir is not None:
            from .render import save_report  # lazily: rendering imports matplotlib

            self.written.append(Path(save_report(report, self.html_dir)))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._active and self.monitor is not None:
            self._active = False
            self.monitor.__exit__(None, None, None)

    @staticmethod
    def _log(trainer: Any, metrics: dict[str, float]) -> None:
        for logger in getattr(trainer, "loggers", ()) or ():
            logger.log_metrics(metrics, step=trainer.global_step)


def write_new(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, never over an existing file.

    The text goes to a temporary file beside ``path`` (:func:`normdoctor.outputs.write_atomic`:
    complete or absent), which is then hard-linked to ``path``: the link fails if ``path``
    exists, also when it appeared meanwhile.
    """
    path = Path(path)
    refused = OutputExistsError(
        f"{path} exists: the report is never written over an existing file (remove it or pass "
        "another json_path)"
    )
    if os.path.lexists(path):
        raise refused
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    write_atomic(tmp, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise refused from None
    finally:
        os.unlink(tmp)
    return path


def _labels(batch: Any) -> Any:
    """The labels of a ``(inputs, labels)`` batch or a dict with ``labels``/``y``/...; else None."""
    import torch

    if isinstance(batch, dict):
        for key in ("labels", "label", "y", "targets", "target"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    return None
