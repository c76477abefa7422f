"""What fits: searches over one knob (GPU count, micro-batch, sequence length, GPU model) by real estimates,
and the storage of many fine-tuned tasks."""

from __future__ import annotations

from estimator.engine import estimate
from estimator.errors import EstimatorError
from estimator.memory import fit_limit_bytes
from estimator.request import EstimateRequest
from estimator.result import Estimate


def _with(req: EstimateRequest, **changes) -> EstimateRequest:
    data = req.model_dump()
    data.update(changes)
    return EstimateRequest(**data)


MAX_GPUS_SEARCHED = 4096  # beyond a few thousand GPUs no single fine-tuning job is realistic


def min_gpus(req: EstimateRequest) -> int | None:
    """Smallest GPU count that fits with ``req.sharding`` (``none``/``ddp``: the best sharding, zero3 then fsdp
    with offload last); None when nothing up to ``MAX_GPUS_SEARCHED`` fits."""
    if estimate(_with(req, num_gpus=1, sharding="none")).fits:
        return 1
    strategies = [req.sharding] if req.sharding in ("zero1", "zero2", "zero3", "fsdp") else ["zero3", "fsdp"]
    best = None
    for strategy in strategies:
        found = _smallest_count(req, strategy)
        if found is not None and (best is None or found < best):
            best = found
    return best


def _smallest_count(req: EstimateRequest, sharding: str) -> int | None:
    def fits(n: int) -> bool:
        return estimate(_with(req, num_gpus=n, sharding=sharding)).fits

    hi = 2
    while hi <= MAX_GPUS_SEARCHED and not fits(hi):
        hi *= 2
    if hi > MAX_GPUS_SEARCHED:
        return None
    lo = hi // 2  # does not fit (or is 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _fits_at(req: EstimateRequest, **changes) -> bool:
    return estimate(_with(req, **changes)).fits


def _confirm(req: EstimateRequest, knob: str, guess: int, step: int, lo: int, hi: int) -> int:
    """Largest value of ``knob`` (a multiple of ``step`` in [lo, hi]) that fits, starting from a model's
    ``guess``: a few real estimates around it, then bisection if the guess was far off."""
    guess = max(lo, min(hi, guess - guess % step))
    if _fits_at(req, **{knob: guess}):
        for _ in range(4):
            if guess + step > hi or not _fits_at(req, **{knob: guess + step}):
                return guess
            guess += step
        good, bad = guess, hi + step
    else:
        for _ in range(4):
            guess -= step
            if guess < lo:
                return 0
            if _fits_at(req, **{knob: guess}):
                return guess
        good, bad = lo - step, guess
        if not _fits_at(req, **{knob: lo}):
            return 0
        good = lo
    while bad - good > step:
        mid = good + ((bad - good) // step // 2) * step
        if _fits_at(req, **{knob: mid}):
            good = mid
        else:
            bad = mid
    return good


def _solve(points: list[tuple[int, dict[str, int]]], limit: int, degree: int) -> float:
    """Largest x with every phase's fitted peak(x) <= limit; phases fitted exactly through the points
    (degree 1: a line through two points; degree 2: a parabola through three)."""
    best = float("inf")
    for phase in points[0][1]:
        xs = [float(x) for x, _ in points]
        ys = [float(p[phase]) for _, p in points]
        if degree == 1:
            slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
            x = float("inf") if slope <= 0 else xs[0] + (limit - ys[0]) / slope
        else:
            (x0, x1, x2), (y0, y1, y2) = xs, ys
            c = ((y2 - y0) / (x2 - x0) - (y1 - y0) / (x1 - x0)) / (x2 - x1)
            b = (y1 - y0) / (x1 - x0) - c * (x0 + x1)
            a = y0 - b * x0 - c * x0 * x0
            if abs(c) < 1e-12:
                x = float("inf") if b <= 0 else (limit - a) / b
            else:
                disc = b * b - 4 * c * (a - limit)
                x = float("inf") if disc < 0 and c < 0 else (-b + disc ** 0.5) / (2 * c) if disc >= 0 else 0.0
        best = min(best, x)
    return best


def max_batch_size(req: EstimateRequest) -> int:
    """Largest micro-batch that fits ``req.gpu`` (0 if batch 1 does not fit).

    Activations are linear in the batch at a fixed length: estimates at batch 1 and 2 give each phase's line,
    the crossing with the GPU memory is the guess, and real estimates around it confirm the answer.
    """
    from estimator.request import MAX_BATCH

    e1 = estimate(_with(req, batch_size=1))
    if not e1.fits:
        return 0
    e2 = estimate(_with(req, batch_size=2))
    if not e2.fits:
        return 1
    x = _solve([(1, e1.memory.phase_peaks), (2, e2.memory.phase_peaks)], fit_limit_bytes(e1.gpu.usable_bytes), 1)
    guess = MAX_BATCH if x == float("inf") else int(min(MAX_BATCH, x))
    return _confirm(req, "batch_size", max(2, guess), 1, 1, MAX_BATCH)


def max_seq_len(req: EstimateRequest, multiple_of: int = 64) -> int:
    """Longest sequence (a multiple of ``multiple_of``, up to the model's context) that fits ``req.gpu``;
    0 if ``multiple_of`` tokens do not fit. Memory is at most quadratic in the length (eager attention), so
    three estimates give each phase's parabola; real estimates around its crossing confirm the answer."""
    from estimator.catalog import resolve_model

    config = resolve_model(req.model).hf_config()
    ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 131072
    hi = max(multiple_of, (min(int(ctx), 1_048_576) // multiple_of) * multiple_of)
    if not _fits_at(req, seq_len=multiple_of):
        return 0
    if _fits_at(req, seq_len=hi):
        return hi
    xs = sorted({max(multiple_of, min(hi, v)) for v in (hi // 8, hi // 4, hi // 2)})
    if len(xs) < 3:
        xs = [multiple_of, max(2 * multiple_of, hi // 2), hi]
    points = [(x, estimate(_with(req, seq_len=x)).memory.phase_peaks) for x in xs[:3]]
    limit = fit_limit_bytes(estimate(_with(req, seq_len=multiple_of)).gpu.usable_bytes)
    x = _solve(points, limit, 2)
    guess = hi if x == float("inf") else int(max(multiple_of, min(hi, x)))
    return _confirm(req, "seq_len", guess, multiple_of, multiple_of, hi)


def fitting_gpus(req: EstimateRequest) -> list[tuple[str, Estimate]]:
    """Every catalog GPU with the estimate of ``req`` on it (same count and sharding), in catalog order.

    A GPU the request cannot run on (bf16 on a card without it) gets the fp16 estimate instead.
    """
    from estimator.catalog import list_gpus

    out = []
    for gpu in list_gpus():
        r = _with(req, gpu=gpu.id)
        if r.dtype == "bf16" and not gpu.bf16_support:
            r = _with(r, dtype="fp16", master_dtype="fp16" if r.master_dtype != "fp32" else "fp32")
        out.append((gpu.id, estimate(r)))
    return out


def storage_for_tasks(est: Estimate, n_tasks: int) -> dict:
    """Bytes for ``n_tasks`` fine-tuned tasks: N full checkpoints vs one 16-bit base + N adapters."""
    if n_tasks < 1:
        raise EstimatorError(f"n_tasks must be at least 1 (got {n_tasks})", field="n_tasks")
    full = n_tasks * est.checkpoint_bytes
    adapters = None
    if est.adapter_bytes is not None:
        adapters = est.storage.base_bytes + n_tasks * est.adapter_bytes
    return {"n_tasks": n_tasks, "full_checkpoints_bytes": full, "base_plus_adapters_bytes": adapters,
            "checkpoint_bytes": est.checkpoint_bytes, "adapter_bytes": est.adapter_bytes,
            "base_bytes": est.storage.base_bytes,
            "ratio": (full / adapters) if adapters else None}

