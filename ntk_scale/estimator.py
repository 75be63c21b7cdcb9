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

from ntk_scale.kernels import FullyConnected, Layer, Network, bind, check_features
from ntk_scale.options import GramOptions, RunOptions, SolveOptions, default, pick


class NTKRegressor(RegressorMixin, BaseEstimator):
    """Kernel ridge regression with an infinite-width NTK (or NNGP) kernel.

    ridge: λ relative to mean(diag K) (Neural Tangents' ``diag_reg``) unless ridge_absolute.
    workdir: where Gram stores and models live (a temporary directory when None).
    operator: "stored" (stream the store here), "distributed" (Ray actors), "dense",
    "matrixfree" (recompute tiles in every product, nothing stored) or "auto" (the cheaper of
    stored and matrix-free from a tile timed here and the store disk's read rate; the choice
    and its reason are kept in ``operator_choice_``).
    workers, address, accelerator, allow_cpu: as :class:`ntk_scale.RunOptions` (on a cluster
    the actors take GPUs, waited for a bounded time, unless allow_cpu lets them fall back).
    """

    def __init__(
        self,
        kernel: FullyConnected | Layer | None = None,
        kind: str = default(GramOptions, "kind"),
        ridge: float = default(SolveOptions, "ridge"),
        ridge_absolute: bool = default(SolveOptions, "ridge_absolute"),
        workdir: str | None = None,
        dtype: str = default(GramOptions, "dtype"),
        tile: int = default(GramOptions, "tile"),
        preconditioner: str = default(SolveOptions, "preconditioner"),
        rank: int = default(SolveOptions, "rank"),
        tol: float = default(SolveOptions, "tol"),
        max_iter: int | None = default(SolveOptions, "max_iter"),
        operator: str = default(SolveOptions, "operator"),
        workers: int | None = default(RunOptions, "workers"),
        address: str | None = default(RunOptions, "address"),
        accelerator: str = default(RunOptions, "accelerator"),
        allow_cpu: bool = default(RunOptions, "allow_cpu"),
        seed: int = default(SolveOptions, "seed"),
        progress: bool = False,
    ):
        _keep(self, locals())

    # -- options ------------------------------------------------------------------------------
    def _options(self) -> tuple[GramOptions, SolveOptions, RunOptions]:
        """The stage options from this estimator's parameters (same names as the fields)."""
        return pick(GramOptions, self), pick(SolveOptions, self), pick(RunOptions, self)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> NTKRegressor:
        """X: (N, d) features or (N, H, W, C) images; y: (N,) or (N, C) targets."""
        from ntk_scale import stages
        from ntk_scale.solve import check_targets

        go, so, run = self._options()
        X, self.sample_shape_ = _rows(X)
        check_targets(y, X.shape[0])
        self.n_features_in_ = X.shape[1]
        spec = bind(
            self.kernel if self.kernel is not None else FullyConnected(), self.sample_shape_
        )
        self.store_ = self._store_path(spec, X, go)
        y = np.asarray(y, dtype=np.float64)
        inputs = stages.Inputs(X, y, None, None, None, self.sample_shape_)
        report = stages.fit(inputs, spec, self.store_, go, so, run)
        self.gram_report_, self.solve_result_ = report.gram, report.solve
        self.solve_report_ = report.solve.report
        self.operator_ = report.solve.decision.operator
        self.operator_choice_ = report.solve.decision.reason
        self.alpha_ = report.solve.alpha
        return self

    def _store_path(self, spec: FullyConnected | Network, X: np.ndarray, go: GramOptions) -> str:
        """The Gram store for these data and kernel settings in workdir (reused by refits)."""
        from ntk_scale.store import fingerprint_rows

        self.workdir_ = (
            self.workdir or getattr(self, "workdir_", None) or tempfile.mkdtemp(prefix="ntk-scale-")
        )
        fp = fingerprint_rows(X, go.dtype)[:16]
        name = f"gram-{spec.fingerprint()[:8]}-{go.kind}-{go.dtype}-{go.tile}-{fp}.zarr"
        return os.path.join(self.workdir_, name)

    # -- predict --------------------------------------------------------------------------------
    def predict(self, X: Any) -> np.ndarray:
        """X: (M, d) (or (M, *sample shape) as in fit) -> (M,) or (M, C) predictions
        K(X, X_train) @ alpha."""
        from ntk_scale import stages
        from ntk_scale.model import Model

        check_is_fitted(self, "alpha_")
        X, shape = _rows(X)
        if len(shape) == len(self.sample_shape_) == 1:
            check_features(X, "X", dim=self.n_features_in_)
        elif shape != self.sample_shape_:
            raise ValueError(f"X has samples of shape {shape}, the model was fitted on "
                             f"{self.sample_shape_}; pass inputs shaped as in fit")  # fmt: skip
        model = Model(self.alpha_, self.solve_result_.meta)
        return stages.predict(model, X, self._options()[2], store=self.store_)

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write the model directory (alpha as Zarr + JSON metadata, as `ntk-scale solve`)."""
        from ntk_scale.model import save_model

        check_is_fitted(self, "alpha_")
        save_model(path, self.alpha_, {**self.solve_result_.meta, **(extra or {})})


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


def _keep(est: BaseEstimator, params: dict[str, Any]) -> None:
    """Store every __init__ argument unchanged under its own name (scikit-learn's contract:
    get_params / clone read them back)."""
    for name, value in params.items():
        if name not in ("self", "__class__"):
            setattr(est, name, value)


def _rows(X: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """X as validated (N, d) rows and the shape of one sample ((d,) for features)."""
    arr = np.asarray(X)
    if arr.ndim > 2:
        return check_features(arr.reshape(arr.shape[0], -1), "X"), tuple(arr.shape[1:])
    arr = check_features(arr, "X")
    return arr, (arr.shape[1],)


#: The ridges a CV estimator tries unless told: relative to mean(diag K), as Neural Tangents'
#: diag_reg (Google Research's Myrtle notebook sweeps logspace(-8, 2)).
DEFAULT_RIDGES = tuple(float(r) for r in np.logspace(-8, 0, 9))


class NTKRegressorCV(NTKRegressor):
    """NTKRegressor with the ridge chosen on held-out rows, in the manner of ``RidgeCV``.

    One Gram store serves every fold and every ridge: each (fold, ridge, target) is a column of
    one PCG run on the fold's training rows (one product with K per iteration for all of them),
    the validation predictions come from the same store, and the model is refitted on all rows
    at the best ridge. ridges: relative to mean(diag K) (absolute with ridge_absolute). cv: k
    folds (an int), one held-out fraction (a float in (0, 1)) or a scikit-learn splitter.
    Fitted: ``ridge_``, ``cv_results_`` (per ridge: mean and per-fold validation scores,
    iterations), ``best_score_`` (higher is better: −MSE, or accuracy for the classifier).
    """

    _metric = "mse"

    def __init__(
        self,
        kernel: FullyConnected | Layer | None = None,
        ridges: Any = DEFAULT_RIDGES,
        cv: Any = 5,
        kind: str = default(GramOptions, "kind"),
        ridge_absolute: bool = default(SolveOptions, "ridge_absolute"),
        workdir: str | None = None,
        dtype: str = default(GramOptions, "dtype"),
        tile: int = default(GramOptions, "tile"),
        preconditioner: str = default(SolveOptions, "preconditioner"),
        rank: int = default(SolveOptions, "rank"),
        tol: float = default(SolveOptions, "tol"),
        max_iter: int | None = default(SolveOptions, "max_iter"),
        operator: str = default(SolveOptions, "operator"),
        workers: int | None = default(RunOptions, "workers"),
        address: str | None = default(RunOptions, "address"),
        accelerator: str = default(RunOptions, "accelerator"),
        allow_cpu: bool = default(RunOptions, "allow_cpu"),
        seed: int = default(SolveOptions, "seed"),
        progress: bool = False,
    ):
        _keep(self, locals())

    def _options(self) -> tuple[GramOptions, SolveOptions, RunOptions]:
        so = pick(SolveOptions, self, ridge=tuple(np.atleast_1d(self.ridges).tolist()),
                  cv=None, holdout=None)  # fmt: skip
        return pick(GramOptions, self), so, pick(RunOptions, self)

    def _folds(self, n: int, labels: Any) -> Any:
        from ntk_scale.solve import make_folds

        cv = self.cv
        if hasattr(cv, "split"):
            return make_folds(n, splitter=cv, y=labels)
        if isinstance(cv, float) and 0 < cv < 1:
            return make_folds(n, holdout=cv, seed=self.seed)
        if isinstance(cv, (int, np.integer)) and not isinstance(cv, bool):
            return make_folds(n, cv=int(cv), seed=self.seed)
        raise ValueError(f"cv={cv!r}: give k folds (an int >= 2), a held-out fraction (a float "
                         "in (0, 1)) or a scikit-learn splitter (KFold(5), ...)")  # fmt: skip

    def fit(self, X: Any, y: Any, labels: Any = None) -> NTKRegressorCV:
        """X: (N, d) or (N, H, W, C); y: (N,) or (N, C). labels: what a splitter stratifies."""
        from ntk_scale import stages
        from ntk_scale.solve import check_targets

        go, so, run = self._options()
        X, self.sample_shape_ = _rows(X)
        check_targets(y, X.shape[0])
        self.n_features_in_ = X.shape[1]
        folds = self._folds(X.shape[0], y if labels is None else labels)
        spec = bind(
            self.kernel if self.kernel is not None else FullyConnected(), self.sample_shape_
        )
        self.store_ = self._store_path(spec, X, go)
        self.gram_report_ = stages.gram(X, spec, self.store_, go, run)
        task = "classification" if self._metric == "accuracy" else "regression"
        res = stages.solve(self.store_, np.asarray(y, dtype=np.float64), so, run, folds=folds,
                           extra={"task": task})  # fmt: skip
        sel = res.selection
        self.ridge_ = sel.ridge
        sign = -1.0 if sel.metric == "mse" else 1.0
        self.best_score_ = sign * float(sel.mean_scores[sel.best])
        self.cv_results_ = {
            "ridge": np.asarray(sel.ridges),
            "mean_test_score": sign * sel.mean_scores,
            **{f"split{f}_test_score": sign * sel.scores[f] for f in range(sel.folds)},
            "iterations": np.asarray(sel.iterations),
            "rank_test_score": (np.argsort(np.argsort(-sign * sel.mean_scores)) + 1),
        }
        self.selection_ = sel
        self.solve_result_, self.solve_report_ = res, res.report
        self.operator_, self.operator_choice_ = res.decision.operator, res.decision.reason
        self.alpha_ = res.alpha
        return self


class NTKClassifierCV(ClassifierMixin, NTKRegressorCV):
    """NTKClassifier with the ridge chosen by held-out accuracy (see NTKRegressorCV)."""

    _metric = "accuracy"

    def fit(self, X: Any, y: Any) -> NTKClassifierCV:
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"y must be a 1-D array of class labels, got shape {y.shape}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has a single class {self.classes_}; classification needs two")
        return super().fit(X, np.eye(len(self.classes_))[codes], labels=codes)

    def decision_function(self, X: Any) -> np.ndarray:
        return NTKRegressor.predict(self, X)

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
