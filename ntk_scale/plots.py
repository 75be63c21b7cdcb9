"""Pictures written next to a model, headless (matplotlib's Agg backend)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_residuals(residuals: np.ndarray, tol: float, path: str) -> str:
    """residuals: (iterations + 1, C) relative residual norms of every column."""
    plt = _pyplot()
    r = np.asarray(residuals, dtype=np.float64)
    r = r[:, None] if r.ndim == 1 else r
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for c in range(r.shape[1]):
        ax.semilogy(np.where(r[:, c] > 0, r[:, c], np.nan), lw=1, label=f"column {c}")
    ax.axhline(tol, color="k", ls="--", lw=1, label=f"tol {tol:g}")
    ax.set_xlabel("PCG iteration")
    ax.set_ylabel("‖r‖ / ‖y‖")
    ax.set_title("Block PCG: relative residual of every right-hand side")
    if r.shape[1] <= 10:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_spectrum(eigenvalues: np.ndarray, lam: float, path: str) -> str:
    """eigenvalues: (r,) Nyström-sketch estimates of K's top eigenvalues; lam: the ridge."""
    plt = _pyplot()
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.loglog(np.arange(1, ev.size + 1), np.where(ev > 0, ev, np.nan), lw=1.5, label="λ_k(K̂)")
    ax.axhline(lam, color="k", ls="--", lw=1, label=f"ridge λ = {lam:.3g}")
    ax.set_xlabel("k")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Kernel eigenvalue decay (Nyström sketch)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_ridge_path(ridges, scores: np.ndarray, metric: str, best: int, path: str) -> str:
    """Validation score vs ridge (log x): the mean over folds, each fold faint, the chosen
    ridge marked. scores: (folds, ridges)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    r = np.asarray(ridges, dtype=np.float64)
    order = np.argsort(r)
    for fold in scores:
        ax.plot(r[order], fold[order], color="0.8", lw=1)
    ax.plot(r[order], scores.mean(axis=0)[order], "o-", label=f"mean validation {metric}")
    ax.axvline(r[best], color="C3", ls="--", label=f"chosen ridge {r[best]:g}")
    ax.set_xscale("log")
    if metric == "mse":
        ax.set_yscale("log")
    ax.set_xlabel("ridge")
    ax.set_ylabel(f"validation {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
