"""tunesmith: fine-tune open language models on your own data, correctly and fast.

The public Python API (the CLI is a thin layer over it):
- `finetune(config_or_options)`: train, returning the output directory and final metrics;
- `load(model)`: a model you can `.generate(...)` and `.stream(...)` with;
- `Chat`: multi-turn conversation with history;
- `evaluate(model, data, compare=None)`: metrics as a dict.
Names are imported lazily so `import tunesmith` stays fast and torch-free.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "finetune": "tunesmith.train.api",
    "load": "tunesmith.infer.generate",
    "generate": "tunesmith.infer.generate",
    "Chat": "tunesmith.infer.chat",
    "evaluate": "tunesmith.eval.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")


__all__ = ["Chat", "evaluate", "finetune", "generate", "load", "__version__"]
