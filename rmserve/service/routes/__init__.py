"""The HTTP routes, one small module per group; ``app.py`` mounts them with their auth."""

from rmserve.service.routes import compat, meta, v1

__all__ = ["compat", "meta", "v1"]
