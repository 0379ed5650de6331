"""Shared test set-up: fully offline, and nothing written outside temporary folders.

The environment variables are set at import time, before any test imports ``datasets``,
``huggingface_hub`` or ``timm`` (they read them when imported).
"""
from __future__ import annotations

import os
import shutil
import tempfile

_TMP = tempfile.mkdtemp(prefix="pleas-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_TMP, "hf_home")
os.environ.setdefault("PLEAS_CACHE", os.path.join(_TMP, "pleas_cache"))
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_unconfigure(config):
    shutil.rmtree(_TMP, ignore_errors=True)
