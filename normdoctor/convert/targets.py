"""The fix vocabulary: what a norm layer can become, and the options each fix takes.

The names are :class:`~normdoctor.metrics.Recommendation`'s values (a scan recommends exactly
the fixes :func:`normdoctor.patch.patch` applies), as plain strings: they are what manifests
record and what ``patch(to=...)`` and the command line take.
"""

from __future__ import annotations

from ..metrics import Recommendation

__all__ = [
    "AUTO",
    "BATCHSTATS",
    "CONVERSIONS",
    "INSTANCE",
    "OPTIONS",
    "RECALIBRATE",
    "RECALIBRATE_OPTIONS",
    "RENORM",
    "RENORM_OPTIONS",
    "TARGETS",
]

RENORM: str = Recommendation.RENORM.value
INSTANCE: str = Recommendation.INSTANCE.value
BATCHSTATS: str = Recommendation.BATCHSTATS.value
RECALIBRATE: str = Recommendation.RECALIBRATE.value
#: ``to`` of :func:`normdoctor.patch.patch` for "each flagged layer of a ScanReport to its
#: recommendation".
AUTO = "auto"

#: Structural conversions (recorded in the manifest); ``recalibrate`` only changes buffers.
CONVERSIONS: tuple[str, ...] = (RENORM, INSTANCE, BATCHSTATS)
TARGETS: tuple[str, ...] = (*CONVERSIONS, RECALIBRATE)

RENORM_OPTIONS = ("r_max", "d_max", "hold_steps", "r_max_steps", "d_max_steps", "schedule")
#: The options of each structural conversion (``dim``: the BatchNorm1d/2d/3d inputs of a layer
#: whose class does not fix it).
OPTIONS: dict[str, tuple[str, ...]] = {
    RENORM: (*RENORM_OPTIONS, "dim"),
    INSTANCE: ("dim",),
    BATCHSTATS: ("prior", "dim"),
}
#: The options of ``patch(to="recalibrate")`` (those of :func:`normdoctor.patch.recalibrate`).
RECALIBRATE_OPTIONS = (
    "mode",
    "batch_size",
    "shuffle",
    "seed",
    "group_by",
    "max_batches",
    "device",
)
