"""Dense float64 oracles for the end-to-end tests: the kernel ridge predictions by Cholesky.

Independent of the store, the scheduler, PCG and the predict stage: only the kernel formula
(``FullyConnected.kernel``) is shared with the code under test.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from ntk_scale.kernels import FullyConnected


def dense_predictions(
    spec: FullyConnected,
    x: np.ndarray,
    y: np.ndarray,
    x_star: np.ndarray,
    *,
    kind: str = "ntk",
    ridge: float = 1e-4,
    ridge_absolute: bool = False,
) -> np.ndarray:
    """K(X*, X) (K + λI)⁻¹ Y in float64, λ = ridge · mean(diag K) (or ridge itself if absolute)."""
    x, x_star = np.asarray(x, dtype=np.float64), np.asarray(x_star, dtype=np.float64)
    k = spec.kernel(x, kind=kind, dtype="float64")
    k_star = spec.kernel(x_star, x, kind=kind, dtype="float64")
    lam = ridge if ridge_absolute else ridge * float(np.mean(np.diag(k)))
    factor = scipy.linalg.cho_factor(k + lam * np.eye(len(k)), lower=True)
    return k_star @ scipy.linalg.cho_solve(factor, np.asarray(y, dtype=np.float64))


def dense_labels(spec: FullyConnected, x, labels, x_star, **kwargs) -> np.ndarray:
    """Classification as ``fit`` does it: one-hot targets, the dense decision values' argmax."""
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    scores = dense_predictions(spec, x, np.eye(len(classes))[codes], x_star, **kwargs)
    return classes[np.argmax(scores, axis=1)]


def relative_max_error(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref|; shapes must match exactly (no broadcasting)."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.all(np.isfinite(got)), "non-finite predictions"
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
