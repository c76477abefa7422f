"""The estimator: parameters, per-GPU memory of one training step, time, cost and storage.

Light to import: torch/transformers/peft load only when an estimate is computed.
"""

from estimator.errors import EstimatorError
from estimator.request import EstimateRequest

__all__ = [
    "Estimate", "EstimateRequest", "EstimatorError", "estimate", "fitting_gpus", "get_gpu", "list_gpus",
    "list_models", "max_batch_size", "max_seq_len", "min_gpus", "resolve_model", "storage_for_tasks",
]

_LAZY = {
    "Estimate": "estimator.estimate", "estimate": "estimator.estimate", "fitting_gpus": "estimator.estimate",
    "max_batch_size": "estimator.estimate", "max_seq_len": "estimator.estimate", "min_gpus": "estimator.estimate",
    "storage_for_tasks": "estimator.estimate", "get_gpu": "estimator.catalog", "list_gpus": "estimator.catalog",
    "list_models": "estimator.catalog", "resolve_model": "estimator.catalog",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'estimator' has no attribute {name!r}")
