"""The scikit-learn face: NTKRegressor and NTKClassifier (gram -> solve -> predict), and their
CV twins that choose the ridge on held-out rows.

Every fit keeps its Gram store in ``workdir`` under a name made of the kernel and data
fingerprints, so refitting the same data with another ridge (GridSearchCV over ``ridge``)
reuses the stored Gram and only solves again.

Inputs are checked by scikit-learn's own helpers (``validate_data``, ``check_is_fitted``,
``check_classification_targets``), so the estimators keep its contract (sparse input refused,
``n_features_in_`` and ``feature_names_in_`` set and checked, its error messages); where
scikit-learn's words do not say how to fix the input, the fix is appended.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ntk_scale import nystrom, posterior, stages, variance
from ntk_scale.kernels import FullyConnected, Network, bind
from ntk_scale.model import Model, save_model
from ntk_scale.options import GramOptions, RunOptions, SolveOptions, estimator_init, pick
from ntk_scale.solve import make_folds
from ntk_scale.store import fingerprint_rows

#: The dtypes X is converted to: float32 and float64 stay as they are (the store converts them
#: to its own dtype), anything else numeric becomes float64.
_FLOATS = (np.float64, np.float32)


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
    method="nystrom": M = ``centers`` centres (``center_selection``), K(X, C) on route ``knm``
    (:mod:`ntk_scale.nystrom`); ``alpha_`` is then (M,) or (M, C) on the centres, whose K(C, C)
    store is ``store_``. method="auto": plan's choice (:func:`ntk_scale.stages.choose_method`),
    kept in ``method_`` and ``method_choice_``.

    Fitted: ``alpha_`` (N,) or (N, C); ``n_iter_`` the PCG iterations of the solve;
    ``n_features_in_`` the width of a row the kernel sees (H·W·C for images);
    ``feature_names_in_`` when X was a DataFrame with string column names; ``sample_shape_``;
    ``store_``; ``solve_report_``; ``operator_`` and ``operator_choice_``; ``dtype_`` the
    Gram's dtype and ``dtype_choice_`` why (``dtype="auto"``: float32 only where its error
    bound is far below λ).
    """

    # Every option record's keyword fields, with their one default (ntk_scale.options).
    __init__ = estimator_init(
        GramOptions, SolveOptions, RunOptions,
        before={"kernel": None}, after={"workdir": None}, defaults={"progress": False},
    )  # fmt: skip

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        # (N, C) targets are C columns of one PCG solve: multi-output regression is native.
        tags.target_tags.multi_output = True
        # Samples of any shape are accepted (images (N, H, W, C) for stax conv kernels; a
        # fully connected kernel sees each sample flattened).
        tags.input_tags.three_d_array = True
        return tags

    # -- options ------------------------------------------------------------------------------
    def _options(self) -> tuple[GramOptions, SolveOptions, RunOptions]:
        """The stage options from this estimator's parameters (same names as the fields)."""
        return pick(GramOptions, self), pick(SolveOptions, self), pick(RunOptions, self)

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> NTKRegressor:
        """X: (N, d) features or (N, H, W, C) images; y: (N,) or (N, C) targets."""
        X, y = _validate_fit(self, X, y, multi_output=True, y_numeric=True)
        return self._fit_rows(X, np.asarray(y, dtype=np.float64))

    def _fit_rows(self, X: np.ndarray, Y: np.ndarray) -> NTKRegressor:
        """Gram, solve on validated rows X (N, d) and float64 targets Y (N,) or (N, C)."""
        go, so, run = self._options()
        posterior.check_posterior(so.posterior, go.kind)
        self.prior_store_ = None  # the NNGP store of posterior "ntk", made on demand
        spec = self._spec()
        go = self._resolve_dtype(X, spec, go, so)
        so = self._resolve_method(X, spec, go, so, run)
        self.store_ = self._store_path(spec, X, go)
        inputs = stages.Inputs(X, Y, None, None, None, self.sample_shape_)
        report = stages.fit(inputs, spec, self.store_, go, so, run,
                            extra={"dtype_choice": self.dtype_choice_,
                                   "method_choice": self.method_choice_},
                            sketch_dir=self._sketch_dir())  # fmt: skip
        self.gram_report_ = report.gram
        self._keep_solve(report.solve)
        return self

    def _sketch_dir(self) -> str:
        """Where the fit's preconditioner sketch is kept beside the store (keyed by the store's
        fingerprint and the preconditioner: refits and predict(return_std=True) reuse it)."""
        return f"{self.store_.rstrip('/')}.sketch"

    def _spec(self) -> FullyConnected | Network:
        kernel = self.kernel if self.kernel is not None else FullyConnected()
        return bind(kernel, self.sample_shape_)

    def _keep_solve(self, res: stages.SolveResult) -> None:
        """The fitted attributes of a stage solve's result."""
        self.solve_result_, self.solve_report_ = res, res.report
        self.operator_, self.operator_choice_ = res.decision.operator, res.decision.reason
        self.alpha_ = res.alpha
        self.n_iter_ = int(res.report.result.iterations)

    def _resolve_dtype(self, X: np.ndarray, spec: Any, go: GramOptions,
                       so: SolveOptions) -> GramOptions:  # fmt: skip
        """go with dtype "auto" resolved at the smallest ridge, before the store is named (a
        refit at another ridge may need the other dtype, hence another store)."""
        go, self.dtype_choice_ = stages.resolve_dtype(X, spec, go, min(so.ridges),
                                                      so.ridge_absolute)  # fmt: skip
        self.dtype_ = go.dtype
        return go

    def _resolve_method(self, X: np.ndarray, spec: Any, go: GramOptions, so: SolveOptions,
                        run: RunOptions) -> SolveOptions:  # fmt: skip
        """so with method "auto" resolved (:func:`ntk_scale.stages.choose_method`, the disk
        of workdir); sets ``method_`` and ``method_choice_``."""
        where = os.path.join(self._workdir(), "store")
        self.method_, self.method_choice_ = stages.choose_method(
            so, spec, X.shape[0], int(np.prod(X.shape[1:])), go, run, where
        )
        return dataclasses.replace(so, method=self.method_)

    def _workdir(self) -> str:
        self.workdir_ = (
            self.workdir or getattr(self, "workdir_", None) or tempfile.mkdtemp(prefix="ntk-scale-")
        )
        return self.workdir_

    def _store_path(self, spec: FullyConnected | Network, X: np.ndarray, go: GramOptions) -> str:
        """The Gram store for these data and kernel settings in workdir (reused by refits)."""
        self._workdir()
        fp = fingerprint_rows(X, go.dtype)[:16]
        name = f"gram-{spec.fingerprint()[:8]}-{go.kind}-{go.dtype}-{go.tile}-{fp}.zarr"
        if self.method_ == "nystrom":  # K(C, C) of these centres: another store per choice
            name = (f"nystrom-{self.centers}-{self.center_selection}-{self.seed}-"
                    + name.removeprefix("gram-"))  # fmt: skip
        return os.path.join(self.workdir_, name)

    # -- predict --------------------------------------------------------------------------------
    def predict(self, X: Any, return_std: bool = False, return_cov: bool = False) -> Any:
        """X: (M, d) (or (M, *sample shape) as in fit) -> (M,) or (M, C) predictions
        K(X, X_train) @ alpha, the posterior mean.

        return_std / return_cov (at most one, as scikit-learn's GaussianProcessRegressor):
        also the posterior's standard deviations (M,) or covariance (M, M), for ``posterior``
        (ntk_scale.posterior; "auto": the kind's own) at the fitted ridge. Several targets
        share them: the kernel is traced over outputs, as in Neural Tangents. "ntk" needs the
        NNGP Gram of the training rows too, computed on the first such call (one more pass
        over the tiles) and kept beside the store (``prior_store_``). Exact method only."""
        check_is_fitted(self)
        X = _validate_predict(self, X)
        model = Model(self.alpha_, self.solve_result_.meta)
        mean = stages.predict(model, X, self._options()[2], store=self.store_)
        if return_std and return_cov:
            raise ValueError("at most one of return_std and return_cov can be True (the "
                             "standard deviations are the covariance's diagonal's roots)")
        if not (return_std or return_cov):
            return mean
        return mean, self._uncertainty(X, full_cov=return_cov)

    def _uncertainty(self, X: np.ndarray, full_cov: bool) -> np.ndarray:
        """The posterior std (M,) or covariance (M, M) of validated rows X."""
        if getattr(self, "method_", "exact") != "exact":
            raise ValueError(f"predict(return_std/return_cov) needs the exact method's store; "
                             f"this model was fitted with method={self.method_!r}: refit with "
                             "method='exact'")  # fmt: skip
        go, so, run = self._options()
        which = posterior.check_posterior(so.posterior, go.kind)
        prior = self._prior_store(go, run) if posterior.needs_prior_train(which) else None
        so = dataclasses.replace(so, operator=self.operator_, ridge=self.solve_report_.lam,
                                 ridge_absolute=True)  # fmt: skip
        return variance.posterior_uncertainty(
            self.store_, X, which, ridge=self.solve_report_.lam, ridge_absolute=True,
            prior_store=prior, options=so, run=run, full_cov=full_cov,
            sketch_dir=self._sketch_dir())

    def _prior_store(self, go: GramOptions, run: RunOptions) -> str:
        """The NNGP Gram of the training rows (the store's copy of X), made once, beside it."""
        if getattr(self, "prior_store_", None) is None:
            self.prior_store_ = stages.nngp_store_for(self.store_, run)
        return self.prior_store_

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write the model directory (alpha as Zarr + JSON metadata, as `ntk-scale solve`)."""
        check_is_fitted(self)
        save_model(path, self.alpha_, {**self.solve_result_.meta, **(extra or {})})


class NTKClassifier(ClassifierMixin, NTKRegressor):
    """Classification by regression on one-hot targets; predicts the argmax class.

    ``decision_function``: (M, n_classes) regressed one-hot scores, or for two classes the
    (M,) score of ``classes_[1]`` minus that of ``classes_[0]`` (scikit-learn's convention:
    > 0 means ``classes_[1]``).
    """

    def __sklearn_tags__(self) -> Any:
        return _classifier_tags(super().__sklearn_tags__())

    def fit(self, X: Any, y: Any) -> NTKClassifier:
        """X: (N, d) or (N, H, W, C); y: (N,) class labels (numbers or strings)."""
        X, codes = _validate_labels(self, X, y)
        return self._fit_rows(X, np.eye(len(self.classes_))[codes])

    def decision_function(self, X: Any) -> np.ndarray:
        return _binary(NTKRegressor.predict(self, X))

    def predict(self, X: Any) -> np.ndarray:
        return _labels(self, NTKRegressor.predict(self, X))


# -- validation ---------------------------------------------------------------------------------
#: A fix appended to scikit-learn's message (matched by a fragment of it) where its own words
#: do not say how to fix the input.
_FIXES = (
    ("0 feature(s)", "pass at least one feature column"),
    ("0 sample(s)", "pass at least one row"),
    ("Complex data not supported", "pass real numbers, e.g. X.real or np.abs(X)"),
    ("requires y to be passed", "call fit(X, y) with the targets y"),
    ("Input y contains", "remove or impute the rows whose target is NaN or infinite"),
    ("Input X contains infinity", "remove or clip the rows with infinite values"),
    ("inconsistent numbers of samples", "pass one target per row of X"),
    ("features, but", "pass rows with the features of the data the model was fitted on"),
)


@contextlib.contextmanager
def _fix_appended() -> Iterator[None]:
    """Re-raise a plain ValueError from scikit-learn's helpers with this project's fix."""
    try:
        yield
    except ValueError as err:
        fix = next((f for key, f in _FIXES if key in str(err)), None)
        if type(err) is not ValueError or fix is None:
            raise
        # After the first line: scikit-learn may print the offending array below it.
        head, sep, rest = str(err).rstrip().partition("\n")
        raise ValueError(f"{head.rstrip('.')}; {fix}{sep}{rest}") from None


def _flat(X: Any) -> tuple[Any, tuple[int, ...] | None]:
    """X with each sample of more than one axis (an image) flattened into a row, and the shape
    of one sample then (None for rows: scikit-learn's validation reads their width)."""
    shape = getattr(X, "shape", None)
    if shape is None:  # a list, or an object that only converts itself (__array__)
        X = np.asarray(X)
        shape = X.shape
    if len(shape) <= 2:
        return X, None
    arr = np.asarray(X)
    return arr.reshape(arr.shape[0], -1), tuple(int(v) for v in arr.shape[1:])


def _validate_fit(est: NTKRegressor, X: Any, y: Any, **check: Any) -> tuple[np.ndarray, Any]:
    """(X as (N, d) float rows, y) validated; sets n_features_in_, feature_names_in_ and
    sample_shape_."""
    X, shape = _flat(X)
    with _fix_appended():
        X, y = validate_data(est, X, y, dtype=_FLOATS, **check)
    est.sample_shape_ = shape or (X.shape[1],)
    return X, y


def _validate_predict(est: NTKRegressor, X: Any) -> np.ndarray:
    """X (M, *sample shape) as (M, d) float rows, checked against the fit's samples."""
    X, shape = _flat(X)
    if (shape or len(est.sample_shape_) > 1) and shape != est.sample_shape_:
        have = shape or np.shape(X)[1:]
        raise ValueError(f"X has samples of shape {have}, the model was fitted on "
                         f"{est.sample_shape_}; pass inputs shaped as in fit")  # fmt: skip
    with _fix_appended():
        return validate_data(est, X, dtype=_FLOATS, reset=False)


def _validate_labels(est: Any, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """(X rows, y as class codes 0..k-1); sets classes_. Refuses continuous y and one class."""
    X, y = _validate_fit(est, X, y, multi_output=False)
    check_classification_targets(y)
    est.classes_, codes = np.unique(y, return_inverse=True)
    if len(est.classes_) < 2:
        raise ValueError(
            f"y holds 1 class ({est.classes_[0]!r}) in n_samples={len(y)}; a classifier needs "
            "at least 2 classes: pass rows of two or more classes"
        )
    return X, codes


def _classifier_tags(tags: Any) -> Any:
    """A classifier's tags over the regressor's: the one-hot targets are internal, so y is one
    column of labels (no multi-output classification), and it is no regressor."""
    tags.target_tags.multi_output = False
    tags.regressor_tags = None
    return tags


def _binary(scores: np.ndarray) -> np.ndarray:
    """Decision values from one-hot scores (M, k): for k = 2 the (M,) margin of class 1."""
    return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores


def _labels(est: Any, scores: np.ndarray) -> np.ndarray:
    """The argmax class of one-hot scores (M, k) (for k = 2: class 1 iff its margin > 0)."""
    return est.classes_[np.argmax(scores, axis=1)]


#: The ridges a CV estimator tries unless told: relative to mean(diag K), as Neural Tangents'
#: diag_reg (Google Research's Myrtle notebook sweeps logspace(-8, 2)).
DEFAULT_RIDGES = tuple(float(r) for r in np.logspace(-8, 0, 9))


class NTKRegressorCV(NTKRegressor):
    """NTKRegressor with the ridge chosen on held-out rows, in the manner of ``RidgeCV``.

    One Gram store serves every fold and every ridge: each (fold, ridge, target) is a column of
    one PCG run on the fold's training rows (one product with K per iteration for all of them),
    the validation predictions come from the same store, and the model is refitted on all rows
    at the best ridge. ridges: relative to mean(diag K) (absolute with ridge_absolute), or
    "auto": a log grid that grows past an edge the best ridge is at, on the same store and
    sketch, within ntk_scale.options.AUTO_RIDGE_BOUNDS. cv: k
    folds (an int), one held-out fraction (a float in (0, 1)) or a scikit-learn splitter.
    Fitted: ``ridge_``, ``cv_results_`` (per ridge: mean and per-fold validation scores,
    iterations), ``best_score_`` (higher is better: −MSE, or accuracy for the classifier);
    ``n_iter_`` the PCG iterations of the refit (the selection's, per ridge, are in
    ``cv_results_["iterations"]``).
    """

    _metric = "mse"

    __init__ = estimator_init(
        GramOptions, SolveOptions, RunOptions,
        before={"kernel": None, "ridges": DEFAULT_RIDGES, "cv": 5}, after={"workdir": None},
        defaults={"progress": False}, exclude=("ridge",),
    )  # fmt: skip

    def _options(self) -> tuple[GramOptions, SolveOptions, RunOptions]:
        auto = isinstance(self.ridges, str) and self.ridges == "auto"
        ridge = "auto" if auto else tuple(np.atleast_1d(self.ridges).tolist())
        so = pick(SolveOptions, self, ridge=ridge, cv=None, holdout=None)
        return pick(GramOptions, self), so, pick(RunOptions, self)

    def _folds(self, n: int, labels: Any) -> Any:
        cv = self.cv
        if hasattr(cv, "split"):
            return make_folds(n, splitter=cv, y=labels)
        if isinstance(cv, float) and 0 < cv < 1:
            _enough_rows(cv, 2, n)
            return make_folds(n, holdout=cv, seed=self.seed)
        if isinstance(cv, (int, np.integer)) and not isinstance(cv, bool) and cv >= 2:
            _enough_rows(cv, int(cv), n)
            return make_folds(n, cv=int(cv), seed=self.seed)
        raise ValueError(f"cv={cv!r}: give k folds (an int >= 2), a held-out fraction (a float "
                         "in (0, 1)) or a scikit-learn splitter (KFold(5), ...)")  # fmt: skip

    def fit(self, X: Any, y: Any, labels: Any = None) -> NTKRegressorCV:
        """X: (N, d) or (N, H, W, C); y: (N,) or (N, C). labels: what a splitter stratifies."""
        X, y = _validate_fit(self, X, y, multi_output=True, y_numeric=True)
        return self._fit_rows(X, np.asarray(y, dtype=np.float64), y if labels is None else labels)

    def _fit_rows(self, X: np.ndarray, Y: np.ndarray, labels: Any = None) -> NTKRegressorCV:
        """The ridge path on the folds of validated rows X (N, d), targets Y, then the refit."""
        go, so, run = self._options()
        posterior.check_posterior(so.posterior, go.kind)
        self.prior_store_ = None  # the NNGP store of posterior "ntk", made on demand
        folds = self._folds(X.shape[0], labels)
        spec = self._spec()
        go = self._resolve_dtype(X, spec, go, so)
        so = self._resolve_method(X, spec, go, so, run)
        self.store_ = self._store_path(spec, X, go)
        task = "classification" if self._metric == "accuracy" else "regression"
        extra = {"task": task, "dtype_choice": self.dtype_choice_,
                 "method_choice": self.method_choice_}  # fmt: skip
        if so.method == "nystrom":
            res, self.gram_report_ = nystrom.fit(X, Y, spec, self.store_, go, so, run,
                                                 folds=folds, extra=extra)  # fmt: skip
        else:
            self.gram_report_ = stages.gram(X, spec, self.store_, go, run)
            res = stages.solve(self.store_, Y, so, run, folds=folds, extra=extra,
                               sketch_dir=self._sketch_dir())  # fmt: skip
        self._keep_selection(res.selection)
        self._keep_solve(res)
        return self

    def _keep_selection(self, sel: Any) -> None:
        """ridge_, best_score_ and cv_results_ of the ridge path (scores: higher is better)."""
        self.ridge_ = sel.ridge
        sign = -1.0 if sel.metric == "mse" else 1.0
        self.best_score_ = sign * float(sel.mean_scores[sel.best])
        self.cv_results_ = {
            "ridge": np.asarray(sel.ridges),
            "mean_test_score": sign * sel.mean_scores,
            **{f"split{f}_test_score": sign * sel.scores[f] for f in range(sel.folds)},
            "iterations": np.asarray(sel.iterations),
            "rank_test_score": (np.argsort(np.argsort(-sign * sel.mean_scores)) + 1),
            "at_edge": np.array([k == sel.best and sel.edge is not None
                                 for k in range(len(sel.ridges))]),  # fmt: skip
        }
        self.ridge_edge_ = sel.edge  # "smallest" / "largest": the best may lie beyond the grid
        self.selection_ = sel


def _enough_rows(cv: Any, need: int, n: int) -> None:
    if n < need:
        raise ValueError(f"cv={cv!r} needs at least {need} rows, got n_samples={n}; pass more "
                         "rows or a smaller cv")  # fmt: skip


class NTKClassifierCV(ClassifierMixin, NTKRegressorCV):
    """NTKClassifier with the ridge chosen by held-out accuracy (see NTKRegressorCV)."""

    _metric = "accuracy"

    def __sklearn_tags__(self) -> Any:
        return _classifier_tags(super().__sklearn_tags__())

    def fit(self, X: Any, y: Any) -> NTKClassifierCV:
        """X: (N, d) or (N, H, W, C); y: (N,) class labels; a splitter stratifies on them."""
        X, codes = _validate_labels(self, X, y)
        return self._fit_rows(X, np.eye(len(self.classes_))[codes], labels=codes)

    def decision_function(self, X: Any) -> np.ndarray:
        return _binary(NTKRegressor.predict(self, X))

    def predict(self, X: Any) -> np.ndarray:
        return _labels(self, NTKRegressor.predict(self, X))
