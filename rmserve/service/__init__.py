"""The scoring service: FastAPI + uvicorn over ONNX Runtime (extra ``serve``).

Public surface: :func:`create_app` (an ASGI app for a :class:`ServiceSettings`) and
:func:`serve` (run it under uvicorn with a graceful shutdown). Imported lazily so that
``import rmserve.service.commands`` (for the CLI) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmserve.service.app import create_app
    from rmserve.service.server import serve
    from rmserve.service.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from rmserve.service.app import create_app

        return create_app
    if name == "serve":
        from rmserve.service.server import serve

        return serve
    if name == "ServiceSettings":
        from rmserve.service.settings import ServiceSettings

        return ServiceSettings
    raise AttributeError(name)
