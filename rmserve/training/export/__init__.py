"""Export a checkpoint to a servable bundle, checking parity before the manifest
(docs/architecture.md: The bundle contract; docs/training.md: Exporting).

The package is layered; a module imports only those below it (tests/core/test_layers.py):

- :mod:`~rmserve.training.export.options` (:class:`ExportOptions`, whose fields generate the
  ``rmserve export`` flags) and :mod:`~rmserve.training.export.plan` (what export decides
  before it writes: the model, its text path, max length, labels and reward head);
- :mod:`~rmserve.training.export.graph`: signatures, wrapper modules, tracing to ONNX;
- :mod:`~rmserve.training.export.checks`: graph parity, the text-path certificate, decision
  parity, the torch reference scores;
- :mod:`~rmserve.training.export.variants`: the int8 / fp16 variants and the packed graphs,
  each behind its gate;
- :mod:`~rmserve.training.export.bundle`: writing the bundle and its manifest, staged and
  moved into place (:func:`export_bundle`).

Beside them, used by the layers and importing none of them: ``quantize`` (per-token int8),
``fusion`` (ONNX Runtime's fused operators), ``packed`` (the packed graph's torch side) and
``onnx_files`` (external data past protobuf's 2 GB).

Importing this package loads nothing heavy: the names below are imported on first use, so
that ``rmserve --help`` can build the export flags from :class:`ExportOptions` without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmserve.training.export.bundle import export_bundle
    from rmserve.training.export.graph import export_onnx
    from rmserve.training.export.options import ExportError, ExportOptions
    from rmserve.training.export.plan import default_model_name

__all__ = ["ExportError", "ExportOptions", "default_model_name", "export_bundle", "export_onnx"]

# Each public name and the module that defines it.
_HOMES = {
    "ExportError": "options",
    "ExportOptions": "options",
    "default_model_name": "plan",
    "export_onnx": "graph",
    "export_bundle": "bundle",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_HOMES[name]}")
    return getattr(module, name)
