"""PNG plots of a ``DeltaAnalysis`` (matplotlib, Agg): |delta| histograms, per-layer change, per-layer conflicts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from delta_analysis.histogram import FIRST_NONFINITE_BIN, bin_edges
from delta_analysis.statistics import THRESHOLDS

if TYPE_CHECKING:
    from delta_analysis.analysis import DeltaAnalysis

HISTOGRAM_PNG, RELATIVE_CHANGE_PNG, SIGN_CONFLICT_PNG = (
    "abs_delta_histogram.png", "relative_change_per_layer.png", "sign_conflict_per_layer.png")


def _save(figure, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _decades(histogram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts regrouped into 8 bins per decade of |delta| (the raw bins are too fine to draw); zeros left out."""
    bins = np.flatnonzero(histogram[:FIRST_NONFINITE_BIN])
    lo, _ = bin_edges(bins)
    keep = lo > 0
    if not keep.any():
        return np.array([1e-8, 1.0]), np.zeros(1)
    start, stop = np.floor(np.log10(lo[keep].min())), np.floor(np.log10(lo[keep].max())) + 1
    edges = np.logspace(start, stop, num=int(stop - start) * 8 + 1)
    counts, _ = np.histogram(lo[keep], bins=edges, weights=histogram[bins][keep])
    return edges, counts


def write_plots(result: DeltaAnalysis, output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in result.models:
        edges, counts = _decades(model.histogram)
        total = max(1, int(model.histogram.sum()))
        ax.stairs(counts / total, edges, label=model.name)
    for t in THRESHOLDS:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", xlabel="|delta| (dotted: 0.002, 0.005, 0.01, 0.03)", ylabel="fraction of parameters",
           title="|finetuned - base|")
    ax.legend(fontsize=7)
    paths.append(_save(fig, output_dir / HISTOGRAM_PNG))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for model in result.models:
        groups = list(model.layers)
        ax.plot(range(len(groups)), [model.layers[g]["relative_change"] or np.nan for g in groups], marker=".",
                label=model.name)
    ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=6)
    ax.set(yscale="log", ylabel="||delta|| / ||base||", title="relative change per layer")
    ax.legend(fontsize=7)
    paths.append(_save(fig, output_dir / RELATIVE_CHANGE_PNG))
    plt.close(fig)

    if result.pairs:
        fig, ax = plt.subplots(figsize=(8, 4))
        for pair in result.pairs:
            groups = list(pair["layers"])
            ax.plot(range(len(groups)), [pair["layers"][g]["sign_conflict_fraction"] for g in groups], marker=".",
                    label=" vs ".join(pair["models"]))
        ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=6)
        ax.set(ylabel="fraction of coordinates", title="sign conflicts per layer (both nonzero, opposite signs)")
        ax.legend(fontsize=7)
        paths.append(_save(fig, output_dir / SIGN_CONFLICT_PNG))
        plt.close(fig)
    return paths
