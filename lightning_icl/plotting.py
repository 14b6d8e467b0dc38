"""Every figure the package draws, and the only module that imports matplotlib.

Figures are drawn on :class:`matplotlib.figure.Figure` objects and written with ``savefig``;
nothing here selects a backend, so importing the package never changes a notebook's plotting.
"""

from __future__ import annotations

import torch


def plot_keep_frequency(summary: dict, path: str) -> str:
    """Heatmap of the keep frequency ``[L, H]``; core heads are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = torch.tensor(summary["frequency"])
    n_l, n_h = freq.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.8 * n_h), 2.0 + 0.6 * n_l))
    image = ax.imshow(freq.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for layer in range(n_l):
        for head in range(n_h):
            value = float(freq[layer, head])
            ax.text(head, layer, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.5 else "white")
    for layer, head in summary["core"]:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(n_h))
    ax.set_yticks(range(n_l))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Head keep frequency over {len(summary['runs'])} subnetworks\n(heuristic core outlined)", fontsize=10)
    fig.colorbar(image, ax=ax, label="fraction keeping the head")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
