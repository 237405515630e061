"""The factory-floor inference daemon: hot folder, HTTP and camera sources -> ONNX Runtime -> SQLite.

Never imports torch. ``Daemon(settings).run()`` is what ``defect serve`` calls; the pieces
(store, sources, model holder, metrics, observer hook) live in their own modules. Names are
imported lazily so ``defect --help`` does not load ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServeSettings": "pipeline.serve.config", "load_settings": "pipeline.serve.config",
    "Daemon": "pipeline.serve.daemon",
    "BatchObserver": "pipeline.serve.observers", "BatchResult": "pipeline.serve.observers",
    "ImageResult": "pipeline.serve.observers", "ImageStats": "pipeline.serve.observers",
    "ResultRow": "pipeline.serve.store", "ResultStore": "pipeline.serve.store", "read_results": "pipeline.serve.store",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.serve' has no attribute {name!r}")
