"""The fitness plot: every candidate, the mean of each generation and the best so far, as a PNG.

Drawn with matplotlib's object interface on an Agg canvas (no pyplot, no process-wide backend).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence


def fitness_png(generations: Sequence[Sequence[float]], title: str = "") -> bytes:
    """The plot of `generations` (the fitness of each candidate, NaN for a failed one) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys, means, best, best_x = [], [], [], [], []
    top = -math.inf
    for g, values in enumerate(generations):
        ok = [v for v in values if math.isfinite(v)]
        xs += [g] * len(ok)
        ys += ok
        if ok:
            means.append((g, sum(ok) / len(ok)))
            top = max(top, *ok)
        if math.isfinite(top):
            best_x.append(g)
            best.append(top)
    ax.scatter(xs, ys, s=8, color="0.7", label="candidates", zorder=1)
    if means:
        ax.plot([g for g, _ in means], [m for _, m in means], color="tab:blue", marker=".", label="generation mean", zorder=2)
    if best:
        ax.plot(best_x, best, color="tab:red", marker=".", label="best so far", zorder=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
