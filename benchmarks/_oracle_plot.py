"""The figure both softmax-selector benchmarks draw: share of the oracle's softmax mass against the budget.

One panel per (data set or family, selector class); x: the budgets N/16, N/8, N/4
(``FRACS`` of the protocol), y: kept mass / oracle mass in [0, 1].
"""

from __future__ import annotations

BUDGET_LABELS = ["N/16", "N/8", "N/4"]


def subplots(rows: int, cols: int, figsize):
    """A (rows, cols) grid of axes on the non-interactive Agg backend (matplotlib is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=figsize, squeeze=False)


def style_panel(ax, title: str, fontsize: float) -> None:
    """Budget ticks, the [0, 1] share axis, a light grid and the panel title."""
    ax.set_xticks(range(len(BUDGET_LABELS)), BUDGET_LABELS)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=fontsize)


def save(fig, path) -> None:
    """Write the figure (PNG, 90 dpi) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
