"""ntk_scale: kernel regression with neural tangent kernels at scale.

The public surface: re-exports only.
"""

from ntk_scale.kernels import FullyConnected, spec_from_json

__version__ = "0.1.0"

__all__ = ["FullyConnected", "__version__", "spec_from_json"]
