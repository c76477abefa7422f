"""finetune-advisor web app: the router. Pages live in pages/; this file only lists them and draws the sidebar.

Start with `make run` (or `ftadvisor app`); it binds to 127.0.0.1 unless told otherwise.
"""

import streamlit as st

from ui.sidebar import draw_sidebar

st.set_page_config(page_title="finetune-advisor", page_icon=":material/tune:", layout="wide")

pages = [
    st.Page("pages/advise.py", title="Advisor", icon=":material/quiz:", url_path="advisor", default=True),
    st.Page("pages/estimate.py", title="Estimate", icon=":material/calculate:", url_path="estimate"),
    st.Page("pages/launch.py", title="Launch", icon=":material/rocket_launch:", url_path="launch"),
    st.Page("pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs"),
    st.Page("pages/adapters.py", title="Adapters", icon=":material/extension:", url_path="adapters"),
]
page = st.navigation(pages)
draw_sidebar()
page.run()
