"""The look shared by every normdoctor figure: palette, labels, figure factory.

Colours come from the Okabe–Ito palette (safe for the common colour-vision deficiencies), and
nothing is told by colour alone: flagged layers are also hatched and marked, series also differ
by marker.  matplotlib is imported inside functions only, so importing this module is free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DRIFT_LABEL",
    "OKABE_ITO",
    "esc",
    "new_figure",
    "num",
    "shorten",
    "style_axes",
]

#: Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
SHIFT_COLOR = OKABE_ITO["blue"]
NOISE_COLOR = OKABE_ITO["orange"]
UNSPLIT_COLOR = "#9a9a9a"  # neutral grey: a bar whose shift/noise split is unknown
OTHER_COLOR = "#b5b5b5"  # context lines (layers not singled out)
TRAIN_COLOR = OKABE_ITO["blue"]
EVAL_COLOR = OKABE_ITO["vermillion"]
THRESHOLD_COLOR = OKABE_ITO["black"]
EDGE_COLOR = "#222222"
#: Series colours and markers, paired so that lines differ by marker as well as by colour.
SERIES = (
    # Blue and vermillion come last: they stand for the train and eval paths elsewhere.
    (OKABE_ITO["green"], "^"),
    (OKABE_ITO["purple"], "D"),
    (OKABE_ITO["orange"], "v"),
    (OKABE_ITO["sky"], "P"),
    (OKABE_ITO["black"], "X"),
    (OKABE_ITO["blue"], "o"),
    (OKABE_ITO["vermillion"], "s"),
)
FLAG_HATCH = "///"
HARMLESS_HATCH = "..."
FLAG_MARKER = "v"
HARMLESS_MARKER = "o"

TITLE_SIZE = 11
LABEL_SIZE = 9
TICK_SIZE = 8
SMALL_SIZE = 7.5

DRIFT_LABEL = "drift, RMS(y_train − y_eval) / RMS(γ)  (dimensionless)"


def new_figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    """A ``Figure`` on an Agg canvas: headless, no pyplot, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def style_axes(ax: Axes, *, grid: Literal["x", "y", "both", ""] = "y") -> None:
    """Light value grid, no top/right spines, readable ticks."""
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=TICK_SIZE)
    if grid:
        ax.grid(axis=grid, color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)


def title(fig: Figure, text: str) -> None:
    """The figure's conclusion, wrapped to the figure's width (bold 11 pt: ~9.5 px a character)."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * fig.dpi / 9.6))
    text = "\n".join(textwrap.wrap(esc(text), width))
    if fig.get_layout_engine() is None:  # fixed margins: pin the title to the top edge
        fig.suptitle(
            text, fontsize=TITLE_SIZE, fontweight="bold", y=1 - 0.1 / fig.get_figheight(), va="top"
        )
    else:
        fig.suptitle(text, fontsize=TITLE_SIZE, fontweight="bold")


def log_axis(ax: Axes, which: str) -> None:
    """Log scale with plain tick labels (0.2, 0.5, 1, 2) instead of overlapping 2x10^-1."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_locator(NullLocator())  # 1-2-5 majors suffice; minor log ticks cost draw time


def esc(text: str) -> str:
    """User text (layer and model names) shown literally: ``$`` would start mathtext."""
    return text.replace("$", r"\$")


def shorten(name: str, width: int = 34) -> str:
    """Keep both ends of a long qualified name: ``backbone.enc…layer4.1.bn2``."""
    if len(name) <= width:
        return name
    keep = width - 1
    head = keep // 3
    return name[:head] + "…" + name[-(keep - head) :]


def named(name: str) -> str:
    """A layer name for a sentence: ``layer 7`` for the bare indices of ``nn.Sequential``."""
    return f"layer {name}" if name.isdigit() else name


def num(x: float | None) -> str:
    """Three significant digits, ``n/a`` when missing."""
    return "n/a" if x is None else f"{x:.3g}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def legend_below(fig: Figure, handles: list[Any], ncols: int = 2, *, outside: bool = True) -> None:
    """One legend for the whole figure, under the axes (constrained layout makes room).

    A handle may be a ``(label, (artist, artist))`` pair: the artists are drawn side by side
    (a hatched patch and a marker, say) under one label.
    """
    from matplotlib.legend_handler import HandlerTuple

    artists, labels = [], []
    for h in handles:
        if isinstance(h, tuple):
            labels.append(h[0])
            artists.append(h[1])
        else:
            labels.append(h.get_label())
            artists.append(h)
    fig.legend(
        artists,
        labels,
        loc="outside lower center" if outside else "lower center",
        ncols=ncols,
        fontsize=SMALL_SIZE + 0.5,
        frameon=False,
        handlelength=2.6,
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0.6)},
    )
