"""Where things live. Shipped data is read from ``data/``; everything the tool writes goes under one home.

``FTADVISOR_HOME`` (default ``<repo>/var``) holds the runs folder and registry, trace caches, converted demo
weights and uploads. Tests point it at a temporary folder.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"


def home() -> Path:
    path = Path(os.environ.get("FTADVISOR_HOME", REPO_ROOT / "var")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    path = Path(os.environ.get("FTADVISOR_RUNS", home() / "runs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> Path:
    path = home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def uploads_dir() -> Path:
    path = home() / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path
