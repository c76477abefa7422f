"""finetune-advisor web app: the router. Pages live in app_pages/ (not pages/: Streamlit treats a pages/ folder
as old-style multipage navigation for a deep link opened first after a server start); this file only lists them
and draws the sidebar.

Start with `make run` (or `ftadvisor app`); it binds to 127.0.0.1 unless told otherwise.
"""

import streamlit as st

from ui.sidebar import draw_sidebar
from ui.warmup import warm_up

st.set_page_config(page_title="finetune-advisor", page_icon=":material/tune:", layout="wide")

pages = [
    st.Page("app_pages/advise.py", title="Advisor", icon=":material/quiz:", url_path="advisor", default=True),
    st.Page("app_pages/estimate.py", title="Estimate", icon=":material/calculate:", url_path="estimate"),
    st.Page("app_pages/launch.py", title="Launch", icon=":material/rocket_launch:", url_path="launch"),
    st.Page("app_pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs"),
    st.Page("app_pages/adapters.py", title="Adapters", icon=":material/extension:", url_path="adapters"),
]
page = st.navigation(pages)
draw_sidebar()
try:
    page.run()
finally:  # after the page is on screen (also when it ended with st.stop): torch & co. load while the user reads
    warm_up()
