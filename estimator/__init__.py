"""The estimator: parameters, per-GPU memory of one training step, time, cost and storage.

Light to import: torch/transformers/peft load only when an estimate is computed.
"""

from estimator.catalog import get_gpu, list_gpus, list_models, resolve_model
from estimator.engine import estimate
from estimator.errors import EstimatorError
from estimator.request import EstimateRequest
from estimator.result import Estimate
from estimator.search import fitting_gpus, max_batch_size, max_seq_len, min_gpus, storage_for_tasks

__all__ = [
    "Estimate", "EstimateRequest", "EstimatorError", "estimate", "fitting_gpus", "get_gpu", "list_gpus",
    "list_models", "max_batch_size", "max_seq_len", "min_gpus", "resolve_model", "storage_for_tasks",
]
