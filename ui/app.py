"""finetune-advisor web app: the router. Pages live in ui/app_pages/ (not pages/: Streamlit treats a pages/ folder
as old-style multipage navigation for a deep link opened first after a server start); this module only lists them
and draws the sidebar. Streamlit runs an entry script that calls ``main()``: the checkout's ``app.py`` or, installed
from the wheel, ``ui/entry/app.py`` (a folder of its own, because Streamlit puts the entry script's folder first on
``sys.path`` and ``ui/datasets.py`` would shadow the ``datasets`` library).

Start with `make run` (or `ftadvisor app`); it binds to 127.0.0.1 unless told otherwise.
"""

import streamlit as st

from ui.nav import page_file
from ui.sidebar import draw_sidebar
from ui.warmup import warm_up

PAGES = (  # name, title, icon, url path
    ("advise", "Advisor", ":material/quiz:", "advisor"),
    ("estimate", "Estimate", ":material/calculate:", "estimate"),
    ("launch", "Launch", ":material/rocket_launch:", "launch"),
    ("runs", "Runs", ":material/monitoring:", "runs"),
    ("adapters", "Adapters", ":material/extension:", "adapters"),
)


def main() -> None:
    """One script run: page config, navigation, sidebar, the page, then the warm-up."""
    st.set_page_config(page_title="finetune-advisor", page_icon=":material/tune:", layout="wide")
    pages = [st.Page(page_file(name), title=title, icon=icon, url_path=url, default=(name == "advise"))
             for name, title, icon, url in PAGES]
    page = st.navigation(pages)
    draw_sidebar()
    try:
        page.run()
    finally:  # after the page is on screen (also when it ended with st.stop): torch & co. load while the user reads
        warm_up()
