"""The Streamlit app: the router (app.py), its pages (app_pages/, run by Streamlit as scripts), the entry scripts
(entry/ and the checkout's app.py) and the helpers the pages share. The only package that imports streamlit."""
