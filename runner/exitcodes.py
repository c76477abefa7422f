"""Exit codes of ``python -m runner.train.worker RUN_DIR`` (the contract with the job manager).

Source: the API contract in the project brief (contracts.md, "Exit codes"). The job manager maps them to a
status and shows ``result.json``'s reason and fix; the worker writes ``result.json`` before exiting.
"""

from __future__ import annotations

COMPLETED = 0  # training finished, adapter/model and report saved
ERROR = 1  # anything not classified below (result.json kind "error")
BAD_SPEC = 2  # spec.json missing or invalid, or a model folder that cannot be used (kind "bad_spec")
DATASET = 3  # the dataset check found errors before any model was loaded (kind "dataset")
MISSING_DEPENDENCY = 4  # e.g. QLoRA without bitsandbytes (kind "missing_dependency")
OUT_OF_MEMORY = 5  # at load, at a training step or at eval (kind "oom_load" | "oom_step" | "oom_eval")
STOPPED = 6  # SIGUSR1 "stop and save": a checkpoint was saved, result.json status "stopped"
RESUME_REFUSED = 7  # --resume with a changed base model, method or dataset (kind "resume_refused")

#: result.json ``kind`` -> exit code.
KIND_TO_CODE: dict[str, int] = {
    "error": ERROR,
    "bad_spec": BAD_SPEC,
    "dataset": DATASET,
    "missing_dependency": MISSING_DEPENDENCY,
    "oom_load": OUT_OF_MEMORY,
    "oom_step": OUT_OF_MEMORY,
    "oom_eval": OUT_OF_MEMORY,
    "stopped": STOPPED,
    "resume_refused": RESUME_REFUSED,
}

#: exit code -> short name, for logs and the job manager's messages.
NAMES: dict[int, str] = {
    COMPLETED: "completed",
    ERROR: "error",
    BAD_SPEC: "bad spec",
    DATASET: "dataset error",
    MISSING_DEPENDENCY: "missing dependency",
    OUT_OF_MEMORY: "out of memory",
    STOPPED: "stopped and saved",
    RESUME_REFUSED: "resume refused",
}
