"""The look shared by every normdoctor figure and the HTML page: palette, labels, figure
factory, the page's stylesheet.

Colours come from the Okabe–Ito palette (safe for the common colour-vision deficiencies), and
nothing is told by colour alone: flagged layers are also hatched and marked, series also differ
by marker.  matplotlib is imported inside functions only, so importing this module is free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from ..text import significant

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DRIFT_LABEL",
    "OKABE_ITO",
    "PAGE_CSS",
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


def clipped_out_of_layout(fig: Figure) -> None:
    """Leave the data artists clipped to their axes out of the layout's bounding boxes.

    They cannot reach outside their axes, so they never move a margin, but matplotlib measures
    each of them on every layout pass (its own test for "clipped to the axes" compares the clip
    box with the axes box for exact float equality, which fails after the layout has moved the
    axes): for a drift overview of 150 layers that is 1700 patch extents per pass, a third of
    the figure's time.  Text (labels beside bars) is not clipped and still counts.
    """
    for ax in fig.axes:
        for artist in (*ax.patches, *ax.collections, *ax.lines):
            if artist.get_clip_on():
                artist.set_in_layout(False)


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
    """Three significant digits, trailing zeros kept (0.350 beside 0.0765: one precision in a
    column, as in the terminal), ``n/a`` when missing."""
    return "n/a" if x is None else significant(x)


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


#: The HTML page's stylesheet (inline in the page): the verdict colours are the palette's
#: vermillion, orange, green and blue.  Narrow screens get one card per layer and figures that
#: scroll sideways at a readable size; print keeps each figure with its caption.
PAGE_CSS = """
:root { --fg:#1d1d1f; --muted:#5b5b66; --line:#d9d9de; --bg:#ffffff; --soft:#f5f5f7;
  --bad:#D55E00; --warn:#E69F00; --good:#009E73; --info:#0072B2;
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: var(--bg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem 1rem 3rem; }
h1 { font-size: 1.5rem; margin: .5rem 0 .75rem; overflow-wrap: anywhere; }
h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; padding-bottom: .2rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 1.25rem 0 .4rem; } h4 { font-size: .95rem; margin: 1rem 0 .3rem; }
p, li { max-width: 75ch; }
code, pre, .mono { font-family: var(--mono); font-size: .9em; }
.verdict { border-left: 6px solid var(--info); background: var(--soft); padding: .75rem 1rem; border-radius: 4px; }
.verdict.bad { border-color: var(--bad); } .verdict.warn { border-color: var(--warn); }
.verdict.good { border-color: var(--good); }
.verdict .big { font-size: 1.2rem; font-weight: 700; margin: 0 0 .35rem; }
.verdict .when { margin: 0 0 .2rem; font-size: .8rem; font-weight: 600; text-transform: uppercase;
  letter-spacing: .04em; color: var(--muted); }
.verdict ul { margin: .25rem 0 0; padding-left: 1.2rem; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(20rem, 1fr)); gap: .75rem; }
.scroll, .fig { overflow-x: auto; -webkit-overflow-scrolling: touch; max-width: 100%; }
.scroll { border: 1px solid var(--line); border-radius: 4px; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; }
th, td { padding: .3rem .5rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); position: sticky; top: 0; white-space: nowrap; }
th.grp { text-align: center; border-left: 1px solid var(--line); }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { font-family: var(--mono); white-space: nowrap; }  /* a name is never split */
td.reason { min-width: 12rem; color: var(--muted); }
tr.flagged td:first-child { box-shadow: inset 5px 0 0 var(--bad); }
tr.harmless td:first-child { box-shadow: inset 5px 0 0 var(--warn); }
.status { font-weight: 600; white-space: nowrap; }
tr.flagged .status, td.flag { color: #a34400; } table.compare tr.flagged .status:not(.flag) { color: inherit; }
details { margin: .4rem 0; } summary { cursor: pointer; font-weight: 600; }
ul.groups { padding-left: 1.2rem; }
figure { margin: 1rem 0 1.5rem; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.figure-missing { border: 1px dashed var(--line); border-radius: 4px; padding: .2rem .8rem; margin: 0 0 1.5rem; }
.concl { display: none; font-weight: 600; margin: .2rem 0 .4rem; }
.swipe { display: none; font-size: .8rem; color: var(--muted); margin: .2rem 0 0; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .4rem; max-width: 75ch; }
.files { font-size: .8rem; color: var(--muted); }
pre { background: var(--soft); padding: .75rem; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
footer { margin-top: 2rem; font-size: .8rem; color: var(--muted); }
footer ul { margin: 0; padding-left: 1.2rem; } code.hash { overflow-wrap: anywhere; font-size: .95em; }
@media (max-width: 600px) {
  body { font-size: 15px; } main { padding: .6rem .6rem 2rem; }
  h1 { font-size: 1.25rem; } .verdict .big { font-size: 1.05rem; }
  /* Layer tables become one card per layer: every column readable without sideways
     scrolling.  Other tables and the figures scroll sideways in their own box. */
  .scroll:has(table.cards) { border: none; }
  table.cards, table.cards tbody { display: block; width: 100%; }
  table.cards thead { display: none; }
  table.cards tr { display: grid; grid-template-columns: 1fr 1fr; column-gap: .8rem;
    border: 1px solid var(--line); border-radius: 4px; margin: 0 0 .6rem; padding: .3rem .5rem; }
  table.cards td.name, table.cards td.reason, table.cards td.status { grid-column: 1 / -1; }
  table.cards tr.flagged { border-left: 6px solid var(--bad); }
  table.cards tr.harmless { border-left: 6px solid var(--warn); }
  table.cards tr td:first-child { box-shadow: none; }
  table.cards td { border: none; padding: .1rem 0; display: grid;
    grid-template-columns: 4.2rem 1fr; gap: .4rem; }
  table.compare tr { grid-template-columns: 1fr; }
  table.compare td { grid-template-columns: 6.5rem 1fr; }
  table.cards td.num { text-align: left; }
  table.cards td.reason { min-width: 0; }
  table.cards td.name { white-space: normal; overflow-wrap: break-word; }  /* a card has room */
  table.cards td::before { content: attr(data-label); color: var(--muted);
    font-family: system-ui, sans-serif; font-weight: 400; }
  table.all th:nth-child(n+3):nth-child(-n+4), table.all td:nth-child(n+3):nth-child(-n+4),
  table.all th:nth-child(n+6):nth-child(-n+8), table.all td:nth-child(n+6):nth-child(-n+8),
  table.all th:nth-child(n+10), table.all td:nth-child(n+10) { display: none; }
  .concl, .swipe { display: block; }
}
@page { margin: 12mm 12mm 14mm; }
@media print {
  body { font-size: 9.5pt; line-height: 1.4; } main { max-width: none; padding: 0; }
  h2 { margin: .9rem 0 .35rem; } h3 { margin: .8rem 0 .3rem; }
  .scroll, .fig { overflow: visible; border: none; }
  th { position: static; }
  table { font-size: 8pt; } td.name { white-space: normal; overflow-wrap: break-word; }
  td.reason { min-width: 16em; }
  /* A figure keeps its heading, image and caption on one page; tall ones shrink to fit. */
  figure, .figure-missing, tr, .verdict { break-inside: avoid; page-break-inside: avoid; }
  figure { margin: .4rem 0 .6rem; } figcaption { font-size: 8.5pt; }
  pre { padding: .35rem .5rem; margin: .3rem 0; }
  footer { font-size: 7pt; margin-top: .5rem; } footer p { margin: 0; }
  figure img { min-width: 0 !important; width: auto; max-width: 100%; max-height: 17cm; }
  h2, h3 { break-after: avoid; page-break-after: avoid; }
  pre, footer { break-before: avoid; break-inside: avoid; }  /* the last lines never alone */
  .files, .swipe { display: none; }
  .verdict, th, tr.flagged td:first-child, tr.harmless td:first-child {
    -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""
