"""rmserve: train Bradley-Terry reward models, export them to ONNX bundles, serve them.

The top-level package is the small shared core (manifest, text formatting, encoding) and
imports nothing beyond the standard library, so that ``import rmserve.client`` stays as light
as httpx. The heavy parts live in subpackages that are imported on demand:

- ``rmserve.training``: data, Bradley-Terry trainer, evaluation, ONNX export (extra ``train``)
- ``rmserve.service``: the FastAPI + ONNX Runtime scoring server (extra ``serve``)
- ``rmserve.client``: the httpx client and trainer integrations (base install)
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
