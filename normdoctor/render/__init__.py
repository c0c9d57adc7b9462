"""Presentation of scan results: matplotlib figures and a self-contained HTML page.

Rendering is called on reports, not by them: ``render.plot(report, "drift")``,
``render.save_report(report, "out")``.  :mod:`normdoctor.report` is data and never imports this
package; importing it installs :func:`plot` and :func:`save_report` behind the deprecated
``ScanReport.plot()`` and ``ScanReport.save_report()``, and the notebook views
(:mod:`.notebook`) behind ``ScanReport._repr_html_`` and ``ScanReport.__rich__``
(:func:`normdoctor.report.register_presenter`).

Nothing here imports matplotlib until a figure is drawn.
"""

from ..report import register_presenter
from .html import figures, save_report
from .notebook import notebook_html, rich_view
from .plots import (
    NothingToPlot,
    batch_distribution_figure,
    caption,
    channels_figure,
    drift_figure,
    end_to_end_figure,
    headline,
    plot,
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
    "plot",
    "save_report",
    "series_figure",
    "sweep_figure",
]

register_presenter("plot", plot)
register_presenter("save_report", save_report)
register_presenter("notebook_html", notebook_html)  # ScanReport._repr_html_
register_presenter("rich", rich_view)  # ScanReport.__rich__
