"""Modules a page uses only further down, imported on first use instead of when the page starts.

``pandas`` costs about half a second of CPU to import (numpy, pyarrow compute), more than the rest of the Advisor's
first question together, and the first question never draws a table. A page writes
``from ui.lazy import pandas as pd`` and uses ``pd.DataFrame`` as usual; the import happens at the first attribute.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module ``name``; the first attribute read imports it (then it is ``sys.modules``' copy)."""

    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str):
        return getattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


pandas = LazyModule("pandas")
