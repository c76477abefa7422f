"""Where things live. Shipped data is read through :func:`data_path`; everything the tool writes goes under one home.

The shipped data (model configs, the GPU table, the decision rules, the demo datasets) is the package
``ftadvisor_data``: the checkout's ``data/`` folder, mapped to that name in ``pyproject.toml`` and installed with
the wheel as package data, so it is found through ``importlib.resources`` whether the code runs from the checkout
(editable install) or from a wheel installed anywhere.

``FTADVISOR_HOME`` holds the runs folder and registry, trace caches, converted demo weights and uploads. Its
default is ``<checkout>/var`` when running from a checkout, else ``$XDG_DATA_HOME/ftadvisor``
(``~/.local/share/ftadvisor``): an installed wheel never writes into site-packages. Tests point it at a
temporary folder.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

#: The folder that holds the first-party packages: the checkout, or site-packages for an installed wheel.
#: Subprocesses get it on PYTHONPATH and as their working folder.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: The import name of the shipped data (the checkout's ``data/`` folder, see pyproject's ``package-dir``).
DATA_PACKAGE = "ftadvisor_data"


def data_path(*parts: str) -> Path:
    """A path inside the shipped data, e.g. ``data_path("models", "catalog.yaml")``; ``data_path()`` is its root.

    Found with ``importlib.resources``; raises RuntimeError when the data package is installed in a form that is
    not a folder on disk (a zip), which pip never produces.
    """
    root = importlib.resources.files(DATA_PACKAGE)
    if not isinstance(root, Path):
        raise RuntimeError(f"the shipped data package {DATA_PACKAGE!r} is not a folder on disk ({root!r}); "
                           "install the wheel with pip so it is unpacked")
    return root.joinpath(*parts)


def is_checkout() -> bool:
    """True when the packages run from a source checkout (the folder above them holds ``pyproject.toml``)."""
    return (REPO_ROOT / "pyproject.toml").is_file()


def _default_home() -> Path:
    if is_checkout():
        return REPO_ROOT / "var"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "ftadvisor"


def home() -> Path:
    path = Path(os.environ.get("FTADVISOR_HOME") or _default_home()).expanduser()
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
