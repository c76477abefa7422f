"""The estimator: parameters, per-GPU memory of one training step, time, cost and storage.

Light to import: torch/transformers/peft load only when an estimate is computed. The functions are bound
here eagerly, so that ``from estimator import estimate`` is always the function even after some other module
imported the submodule ``estimator.estimate`` (which would otherwise rebind the package attribute).
"""

from estimator.catalog import get_gpu, list_gpus, list_models, resolve_model
from estimator.errors import EstimatorError
from estimator.estimate import (Estimate, estimate, fitting_gpus, max_batch_size, max_seq_len, min_gpus,
                                storage_for_tasks)
from estimator.request import EstimateRequest

__all__ = [
    "Estimate", "EstimateRequest", "EstimatorError", "estimate", "fitting_gpus", "get_gpu", "list_gpus",
    "list_models", "max_batch_size", "max_seq_len", "min_gpus", "resolve_model", "storage_for_tasks",
]
