"""The contract every GramOperator passes against its dense twin.

Subclass ``OperatorContract`` in a ``Test…`` class and define ``make_pair(self)`` returning
``(operator, K)`` where K is the (N, N) float64 dense matrix the operator stands for; set
``rtol`` for operators that store float32 (their products are still returned in float64).
"""

from __future__ import annotations

import numpy as np
import pytest

from ntk_scale.linalg import GramOperator


class OperatorContract:
    rtol = 1e-12
    #: Store-backed operators compute K[:, idx] from X in the storage precision (cheaper than
    #: reading block columns): equal to the stored entries up to that precision's rounding.
    columns_rtol: float | None = None
    storage_dtypes = (np.float32, np.float64)

    def make_pair(self) -> tuple[GramOperator, np.ndarray]:
        raise NotImplementedError("subclasses return (operator, dense float64 twin)")

    @pytest.fixture
    def pair(self) -> tuple[GramOperator, np.ndarray]:
        return self.make_pair()

    def assert_close(self, got: np.ndarray, want: np.ndarray, rtol: float | None = None) -> None:
        assert got.dtype == np.float64
        assert got.shape == want.shape
        scale = np.abs(want).max() or 1.0
        np.testing.assert_allclose(got, want, rtol=0, atol=(rtol or self.rtol) * scale)

    def test_is_gram_operator(self, pair):
        op, _ = pair
        assert isinstance(op, GramOperator)

    def test_shape_and_dtype(self, pair):
        op, K = pair
        assert op.shape == K.shape
        assert op.shape[0] == op.shape[1]
        assert np.dtype(op.dtype) in self.storage_dtypes

    @pytest.mark.parametrize("C", [1, 3])
    def test_matmat_matches_dense(self, pair, C):
        op, K = pair
        P = np.random.default_rng(C).standard_normal((K.shape[0], C))
        self.assert_close(op.matmat(P), K @ P)

    def test_matmat_rejects_wrong_shape(self, pair):
        op, K = pair
        with pytest.raises(ValueError, match="reshape"):
            op.matmat(np.ones(K.shape[0]))

    def test_diag(self, pair):
        op, K = pair
        self.assert_close(op.diag(), np.diag(K).copy())

    def test_columns(self, pair):
        op, K = pair
        idx = np.random.default_rng(1).choice(K.shape[0], size=min(7, K.shape[0]), replace=False)
        idx = np.concatenate([idx, idx[:2]])  # unsorted, with repeats
        self.assert_close(op.columns(idx), K[:, idx], self.columns_rtol)

    def test_columns_rejects_out_of_range(self, pair):
        op, K = pair
        with pytest.raises(ValueError, match="column indices"):
            op.columns(np.array([0, K.shape[0]]))
