"""Where the app's pages live, for the router (``ui/app.py``) and for pages that switch to another page.

Paths are absolute, so they hold whichever entry script Streamlit runs: the checkout's ``app.py`` or the installed
package's ``ui/entry/app.py`` (``ftadvisor app``).
"""

from __future__ import annotations

from pathlib import Path

PAGES_DIR = Path(__file__).resolve().parent / "app_pages"


def page_file(name: str) -> str:
    """Absolute path of page ``name`` (``"launch"`` -> ``.../ui/app_pages/launch.py``)."""
    path = PAGES_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no app page {name!r} in {PAGES_DIR}")
    return str(path)
