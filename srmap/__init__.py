"""SRMAP: 4x single-image super-resolution trained as explicit MAP estimation.

Submodules are imported on demand (``from srmap.nets import Generator``) so that
``import srmap`` stays cheap and never pulls in torch, MLflow or LPIPS.
"""

__version__ = "0.1.0"
