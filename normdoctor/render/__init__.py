"""Presentation of scan results: matplotlib figures and a self-contained HTML page.

Nothing here imports matplotlib until a figure is drawn.
"""

from .html import figures, save_report
from .plots import (
    NothingToPlot,
    batch_distribution_figure,
    caption,
    channels_figure,
    drift_figure,
    end_to_end_figure,
    headline,
    series_figure,
    sweep_figure,
)

__all__ = [
    "NothingToPlot",
    "batch_distribution_figure",
    "caption",
    "channels_figure",
    "drift_figure",
    "end_to_end_figure",
    "figures",
    "headline",
    "save_report",
    "series_figure",
    "sweep_figure",
]
