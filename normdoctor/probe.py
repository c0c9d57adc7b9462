"""Deprecated module: :class:`Probe` lives in :mod:`normdoctor.sources.torch`, the
accumulators in :mod:`normdoctor.recording`.  Kept so that existing imports go on working."""

from __future__ import annotations

from .layers import NormState, module_state
from .recording import PATHS, LayerMeasurement, PathName, Recorder
from .sources.torch import Probe

Path = PathName  # the old name, which read like pathlib.Path

__all__ = ["PATHS", "LayerMeasurement", "NormState", "Path", "Probe", "Recorder", "module_state"]
