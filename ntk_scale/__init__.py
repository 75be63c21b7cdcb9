"""ntk_scale: kernel regression with neural tangent kernels at scale.

The public surface: re-exports only.
"""

from ntk_scale.estimator import NTKClassifier, NTKRegressor
from ntk_scale.kernels import FullyConnected, spec_from_json
from ntk_scale.store import GramStore

__version__ = "0.1.0"

__all__ = [
    "FullyConnected",
    "GramStore",
    "NTKClassifier",
    "NTKRegressor",
    "__version__",
    "spec_from_json",
]
