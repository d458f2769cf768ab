"""zipper: merge same-architecture CNNs into one multi-task network by zippering."""

from .merge import ZipperNet, ZipperSpec, deepen, load, zip_models
from .models import build_model

__version__ = "0.1.0"
__all__ = ["ZipperNet", "ZipperSpec", "build_model", "deepen", "load", "zip_models", "__version__"]
