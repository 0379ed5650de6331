"""``python -m pleas.merge MODEL_A MODEL_B --width W``; ``pleas.merge(...)`` in Python.

This module is both the CLI entry point and callable as the API function: importing it never
shadows :func:`pleas.pipeline.merge` (the module object forwards calls to it).
"""
from __future__ import annotations

import sys
import types

from .cli_merge import main
from .pipeline import merge as _merge


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    raise SystemExit(main())
