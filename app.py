"""The checkout's entry script: `make run` runs `streamlit run app.py`; the router is ``ui.app``."""

from ui.app import main

main()
