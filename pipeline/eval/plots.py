"""The evaluation report's PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.eval.methods import UNPRUNED  # noqa: E402
from pipeline.eval.records import Record  # noqa: E402


def pareto(records: list[Record], path: Path) -> None:
    """Accuracy vs achieved N_bar share, one line per method; the unpruned model as a line."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    ref = next((r for r in records if r.method == UNPRUNED), None)
    methods = [m for m in dict.fromkeys(r.method for r in records) if m != UNPRUNED]
    for ax, (title, get) in zip(
        axes,
        (
            ("all", lambda r: r.accuracy),
            ("fine", lambda r: r.accuracy_by_family.get("fine")),
            ("coarse", lambda r: r.accuracy_by_family.get("coarse")),
        ),
    ):
        for m in methods:
            pts = sorted(
                (r.n_bar_share, get(r))
                for r in records
                if r.method == m and r.n_bar_share is not None and get(r) is not None
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, lw=2.5 if m == "atp" else 1.2)
        if ref is not None and get(ref) is not None:
            ax.axhline(get(ref), color="k", ls="--", lw=1, label=UNPRUNED)
        ax.set_title(f"accuracy ({title} questions)")
        ax.set_xlabel("achieved N_bar / Lv")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tokens_per_layer(records: list[Record], atp_layers: list[int], path: Path) -> None:
    """Visual tokens attended by each decoder layer, ATP at each budget, per question family."""
    atp = [r for r in records if r.method == "atp"]
    fig, axes = plt.subplots(1, max(1, len(atp)), figsize=(5 * max(1, len(atp)), 4), squeeze=False)
    for ax, r in zip(axes[0], atp):
        for fam, per_layer in sorted(r.tokens_per_layer_by_family.items()):
            if per_layer:
                ax.step(range(len(per_layer)), per_layer, where="post", marker=".", label=fam)
        for i in atp_layers:
            ax.axvline(i, color="grey", lw=0.6, ls=":")
        ax.set_title(f"ATP at budget {r.budget:.0%} (N_bar {r.n_bar:.1f})")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("visual tokens")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlays(items: list[dict], path: Path) -> None:
    """Paper Fig. 4: each image, then the tokens kept after each ATP module (pruned dimmed)."""
    import numpy as np

    if not items:
        return
    k = items[0]["keep"].shape[0]
    fig, axes = plt.subplots(len(items), k + 1, figsize=(2.6 * (k + 1), 2.8 * len(items)), squeeze=False)
    for row, it in zip(axes, items):
        img = np.asarray(it["image"], dtype=np.float32) / 255.0
        g = it["grid"]
        keep = it["keep"][:, -g * g :].numpy().reshape(k, g, g)
        h, w = img.shape[:2]
        rows, cols = np.arange(h) * g // h, np.arange(w) * g // w  # pixel -> patch
        row[0].imshow(img)
        row[0].set_title(it["title"][:64], fontsize=6)
        for j in range(k):
            mask = keep[j][np.ix_(rows, cols)]
            row[j + 1].imshow(img * (0.15 + 0.85 * mask[..., None]))
            row[j + 1].set_title(f"before layer {it['layers'][j]}: {int(keep[j].sum())} kept", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
