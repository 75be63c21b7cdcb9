"""scikit-learn's contract for the four estimators: its own estimator checks (the default suite
of parametrize_with_checks, nothing skipped or expected to fail beyond what scikit-learn itself
reads from the estimators' tags), and the behaviours behind them against a dense float64 solve
(scipy cho_solve) of the same kernel.

The checks fit tens of rows: a small tile and preconditioner rank keep them quick, and every fit
runs on the one local Ray of the session (``ray_local``) and its persistent pool.
"""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.linalg import cho_factor, cho_solve
from sklearn.utils.estimator_checks import parametrize_with_checks

from ntk_scale import (
    ConvergenceWarning,
    FullyConnected,
    NTKClassifier,
    NTKClassifierCV,
    NTKRegressor,
    NTKRegressorCV,
)

#: A small preconditioner rank, and tiles of 64 rows: scikit-learn's check data hold 10 to 300
#: rows, so the larger ones still span several tiles, while smaller tiles cost more in Ray calls
#: and store reads than they save (check_classifiers_train on NTKClassifierCV: 19 s at tile 64,
#: 38 s at 32, ~60 s at 16, 23 s at 128).
SMALL = {"tile": 64, "rank": 20}
#: The CV estimators check with 3 folds of 3 ridges, not the default 5 folds of 9 (down to
#: 1e-8, whose ill-conditioned column sets the iteration count of every solve): the contract
#: checked does not depend on the grid, and check_classifiers_train took 16 s each.
SMALL_CV = {**SMALL, "cv": 3, "ridges": (1e-4, 1e-2, 1.0)}
ESTIMATORS = [NTKRegressor(**SMALL), NTKClassifier(**SMALL), NTKRegressorCV(**SMALL_CV),
              NTKClassifierCV(**SMALL_CV)]  # fmt: skip
SPEC = FullyConnected(depth=2, activation="relu", W_std=1.4, b_std=0.1)


@parametrize_with_checks(ESTIMATORS)
def test_scikit_learn_estimator_checks(estimator, check, ray_local, tmp_path):
    # The Gram stores of the check's fits go to this test's directory (clone keeps workdir).
    check(estimator.set_params(workdir=str(tmp_path)))


def _dense_scores(x, targets, xs, ridge=1e-4):
    """K(xs, x) (K + λI)^-1 targets in float64, λ = ridge · mean(diag K)."""
    k = SPEC.kernel(x, dtype="float64")
    lam = ridge * np.mean(np.diag(k))
    return SPEC.kernel(xs, x, dtype="float64") @ cho_solve(cho_factor(k + lam * np.eye(len(k))),
                                                          targets)  # fmt: skip


def _blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 3)) + 1.5 * labels[:, None]
    return x, labels


def test_string_labels_binary_decision_matches_dense_solve_and_predict(ray_local, tmp_path):
    x, codes = _blobs()
    y = np.array(["no", "yes"])[codes]
    clf = NTKClassifier(kernel=SPEC, dtype="float64", tile=32, tol=1e-10,
                        workdir=str(tmp_path)).fit(x, y)  # fmt: skip
    ref = _dense_scores(x, np.eye(2)[codes], x[:20])
    decision = clf.decision_function(x[:20])
    assert decision.shape == (20,)
    np.testing.assert_allclose(decision, ref[:, 1] - ref[:, 0], rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(clf.predict(x[:20]), np.where(decision > 0, "yes", "no"))
    assert list(clf.classes_) == ["no", "yes"]


def test_dataframe_gives_feature_names_and_the_dense_solve(ray_local, tmp_path):
    pd = pytest.importorskip("pandas")
    x, codes = _blobs(40, seed=1)
    y = np.stack([codes, x[:, 0]], axis=1)  # two targets
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    est = NTKRegressor(kernel=SPEC, dtype="float64", tile=32, tol=1e-10, workdir=str(tmp_path))
    est.fit(frame, y)
    assert list(est.feature_names_in_) == ["a", "b", "c"] and est.n_features_in_ == 3
    np.testing.assert_allclose(est.predict(frame), _dense_scores(x, y, x), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="feature names"):
        est.predict(frame[["c", "b", "a"]])


def test_n_iter_counts_the_pcg_iterations(ray_local, tmp_path):
    x, codes = _blobs(40, seed=2)
    # Without a preconditioner and with an unreachable tolerance PCG runs to max_iter.
    capped = NTKRegressor(kernel=SPEC, dtype="float64", tile=32, preconditioner="none",
                          tol=1e-15, max_iter=3, workdir=str(tmp_path))  # fmt: skip
    with pytest.warns(ConvergenceWarning):
        capped.fit(x, codes.astype(float))
    assert capped.n_iter_ == 3
    # A rank-N Nyström preconditioner is (K + λI) itself: one or two iterations.
    exact = NTKRegressor(kernel=SPEC, dtype="float64", tile=32, rank=40, tol=1e-8,
                         workdir=str(tmp_path)).fit(x, codes.astype(float))  # fmt: skip
    assert 1 <= exact.n_iter_ <= 3


def test_refusals_in_scikit_learn_words_with_the_fix(ray_local, tmp_path):
    x, codes = _blobs(30, seed=3)
    est = NTKRegressor(kernel=SPEC, tile=32, workdir=str(tmp_path))
    with pytest.raises(TypeError, match="Sparse data was passed.*toarray"):
        est.fit(sp.csr_matrix(x), codes)
    with pytest.raises(ValueError, match=r"0 feature\(s\).*; pass at least one feature column"):
        est.fit(np.zeros((30, 0)), codes)
    with pytest.raises(ValueError, match="Complex data not supported; pass real numbers"):
        est.fit(x + 1j, codes)
    with pytest.raises(ValueError, match="requires y to be passed.*; call fit\\(X, y\\)"):
        est.fit(x, None)
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        NTKClassifier(kernel=SPEC, tile=32, workdir=str(tmp_path)).fit(x, x[:, 0])
    with pytest.raises(ValueError, match="n_samples=3; pass more rows or a smaller cv"):
        NTKRegressorCV(kernel=SPEC, cv=5, workdir=str(tmp_path)).fit(x[:3], codes[:3])
