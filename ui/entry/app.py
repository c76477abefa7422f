"""The installed package's entry script (``ftadvisor app`` runs ``streamlit run`` on it); the router is ``ui.app``."""

from ui.app import main

main()
