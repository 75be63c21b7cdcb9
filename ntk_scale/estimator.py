"""The scikit-learn face: NTKRegressor and NTKClassifier (gram -> solve -> predict).

Every fit keeps its Gram store in ``workdir`` under a name made of the kernel and data
fingerprints, so refitting the same data with another ridge (GridSearchCV over ``ridge``)
reuses the stored Gram and only solves again.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from ntk_scale.kernels import FullyConnected, check_features
from ntk_scale.kernels.validate import DTYPES, KINDS, check_choice


class NTKRegressor(RegressorMixin, BaseEstimator):
    """Kernel ridge regression with an infinite-width NTK (or NNGP) kernel.

    ridge: λ relative to mean(diag K) (Neural Tangents' ``diag_reg``) unless ridge_absolute.
    workdir: where Gram stores and models live (a temporary directory when None).
    operator: "stored" (stream the store here), "distributed" (Ray actors), "dense",
    "matrixfree" (recompute tiles in every product, nothing stored) or "auto" (the cheaper of
    stored and matrix-free from a tile timed here and the store disk's read rate; the choice
    and its reason are kept in ``operator_choice_``).
    """

    def __init__(
        self,
        kernel: FullyConnected | None = None,
        kind: str = "ntk",
        ridge: float = 1e-4,
        ridge_absolute: bool = False,
        workdir: str | None = None,
        dtype: str = "float32",
        tile: int = 2048,
        preconditioner: str = "rpcholesky",
        rank: int = 500,
        tol: float = 1e-6,
        max_iter: int | None = None,
        operator: str = "stored",
        workers: int | None = None,
        address: str | None = None,
        seed: int = 0,
        progress: bool = False,
    ):
        self.kernel = kernel
        self.kind = kind
        self.ridge = ridge
        self.ridge_absolute = ridge_absolute
        self.workdir = workdir
        self.dtype = dtype
        self.tile = tile
        self.preconditioner = preconditioner
        self.rank = rank
        self.tol = tol
        self.max_iter = max_iter
        self.operator = operator
        self.workers = workers
        self.address = address
        self.seed = seed
        self.progress = progress

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> NTKRegressor:
        """X: (N, d) features, y: (N,) or (N, C) targets."""
        X = check_features(X, "X")
        Y = self._targets(y, X.shape[0])
        self.n_features_in_ = X.shape[1]
        self.store_ = self._gram(X)
        self._solve(Y)
        return self

    def _targets(self, y: Any, n: int) -> np.ndarray:
        from ntk_scale.solve import check_targets

        check_targets(y, n)
        return np.asarray(y, dtype=np.float64)

    def _gram(self, X: np.ndarray) -> str:
        from ntk_scale.scheduler import RunOptions, run_store
        from ntk_scale.store import GramStore, fingerprint_rows

        check_choice("kind", self.kind, KINDS)
        check_choice("dtype", self.dtype, DTYPES)
        spec = self.kernel if self.kernel is not None else FullyConnected()
        self.workdir_ = (
            self.workdir or getattr(self, "workdir_", None) or tempfile.mkdtemp(prefix="ntk-scale-")
        )
        fp = fingerprint_rows(X, self.dtype)[:16]
        name = f"gram-{spec.fingerprint()[:8]}-{self.kind}-{self.dtype}-{self.tile}-{fp}.zarr"
        store = os.path.join(self.workdir_, name)
        opts = RunOptions(workers=self.workers, address=self.address, progress=self.progress)
        gram = GramStore.create(store, spec, X, kind=self.kind, dtype=self.dtype, tile=self.tile)
        self.operator_ = self._pick_operator(spec, X.shape)
        if self.operator_ != "matrixfree":
            self.gram_report_ = run_store(gram, opts)
        return store

    def _pick_operator(self, spec: FullyConnected, shape: tuple[int, int]) -> str:
        if self.operator != "auto":
            self.operator_choice_ = None
            return self.operator
        from ntk_scale.planning import choose_operator, measure_read_rate, plan_gram

        workers = self.workers or os.cpu_count() or 1
        plan = plan_gram(shape[0], shape[1], spec, self.kind, self.dtype, self.tile, workers)
        self.operator_choice_ = choose_operator(plan, measure_read_rate(self.workdir_))
        return self.operator_choice_.choice

    def _solve(self, Y: np.ndarray) -> None:
        from ntk_scale.solve import solve_store

        report = solve_store(
            self.store_,
            Y,
            ridge=self.ridge,
            ridge_absolute=self.ridge_absolute,
            preconditioner=self.preconditioner,
            rank=min(self.rank, Y.shape[0]),
            tol=self.tol,
            max_iter=self.max_iter,
            operator=self.operator_,
            workers=self.workers or 2,
            seed=self.seed,
        )
        self.solve_report_ = report
        self.alpha_ = report.result.x

    # -- predict --------------------------------------------------------------------------------
    def predict(self, X: Any) -> np.ndarray:
        """X: (M, d) -> (M,) or (M, C) predictions K(X, X_train) @ alpha."""
        from ntk_scale.predict import predict_from_store

        check_is_fitted(self, "alpha_")
        X = check_features(X, "X", dim=self.n_features_in_)
        return predict_from_store(self.store_, self.alpha_, X, self.workers, self.address)

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write the model directory (alpha as Zarr + JSON metadata)."""
        from ntk_scale.model import save_model
        from ntk_scale.store import GramStore

        check_is_fitted(self, "alpha_")
        store = GramStore.open(self.store_)
        res, rep = self.solve_report_.result, self.solve_report_
        meta = {
            "kernel": store.meta.kernel,
            "kind": self.kind,
            "dtype": self.dtype,
            "ridge": self.ridge,
            "ridge_absolute": self.ridge_absolute,
            "lam": rep.lam,
            "store": self.store_,
            "store_fingerprint": store.fingerprint,
            "solver": {
                "preconditioner": rep.preconditioner,
                "rank": rep.rank,
                "tol": self.tol,
                "iterations": int(res.iterations),
                "converged": np.asarray(res.converged).tolist(),
                "final_relative_residuals": np.asarray(res.residuals)[-1].tolist(),
                "setup_seconds": rep.setup_seconds,
                "iteration_seconds": rep.iteration_seconds,
            },
            **(extra or {}),
        }
        save_model(path, self.alpha_, meta)


class NTKClassifier(ClassifierMixin, NTKRegressor):
    """Classification by regression on one-hot targets; predicts the argmax class."""

    def fit(self, X: Any, y: Any) -> NTKClassifier:
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"y must be a 1-D array of class labels, got shape {y.shape}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has a single class {self.classes_}; classification needs two")
        onehot = np.eye(len(self.classes_))[codes]
        return super().fit(X, onehot)

    def decision_function(self, X: Any) -> np.ndarray:
        return super().predict(X)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
