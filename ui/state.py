"""Session-state keys shared between pages (one place, so pages never disagree on a name)."""

from __future__ import annotations

# The advisor's answers (a dict of Answers fields) kept for the whole session, across page switches.
ANSWERS = "advisor_answers"
# Which group of questions the advisor shows (0-based), kept across page switches.
ADVISOR_STEP = "advisor_step"
# The last Recommendation computed from ANSWERS (pydantic object), and its answers' JSON.
RECOMMENDATION = "advisor_recommendation"
# A RunSpec (as a JSON dict) handed to the Launch page ("Launch this run" on the advisor).
LAUNCH_SPEC = "launch_spec"
# Where the spec in LAUNCH_SPEC came from, shown on the Launch page ("advisor", "runs", ...).
LAUNCH_SOURCE = "launch_source"
# The run the Runs page shows in detail.
SELECTED_RUN = "runs_selected"
# Adapters page: base model folder and adapter folders chosen.
ADAPTER_BASE = "adapters_base"
# The catalog GPU the handed-over spec was sized for (the advisor's choice), used for the Launch page estimate.
LAUNCH_GPU = "launch_gpu"
# Token of the spec the Launch form was last filled from (so a new hand-over refills the form once).
LAUNCH_LOADED = "launch_loaded"
# The last run launched from the Launch page (its id).
LAUNCHED_RUN = "launch_last_run"
