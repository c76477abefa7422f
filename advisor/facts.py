"""The facts the rules read: the answers plus a few figures derived from the catalogs (pure, no estimator call)."""

from __future__ import annotations

from typing import Any

from advisor.answers import Answers

GIB = 2**30
# The seed's "GPU Cluster (8+ A100s)" (Decision Framework, Q2): eight or more datacenter GPUs make a cluster.
CLUSTER_MIN_GPUS = 8


def gpu_class(answers: Answers, gpu_kind: str | None) -> str:
    """consumer | single-datacenter | multi-datacenter | cluster | rent (the seed's Q2 options)."""
    if answers.rent_in_cloud:
        return "rent"
    if gpu_kind == "consumer":
        return "consumer"
    if answers.num_gpus >= CLUSTER_MIN_GPUS:
        return "cluster"
    return "single-datacenter" if answers.num_gpus == 1 else "multi-datacenter"


def make_facts(answers: Answers, *, model_params: int, gpu_memory_bytes: int | None, gpu_kind: str | None) -> dict[str, Any]:
    """Answers fields + model_params_b, gpu_memory_gib, total_gpu_memory_gib, gpu_class.

    ``model_params``: total parameters of the model (count); ``gpu_memory_bytes``: memory of ONE GPU in bytes
    (None when renting).
    """
    facts = answers.model_dump()
    per_gpu_gib = (gpu_memory_bytes or 0) / GIB
    facts.update(
        model_params_b=model_params / 1e9,
        gpu_memory_gib=per_gpu_gib,
        total_gpu_memory_gib=per_gpu_gib * (0 if answers.rent_in_cloud else answers.num_gpus),
        gpu_class=gpu_class(answers, gpu_kind),
        rank=0,
        target_modules="",
    )
    return facts
