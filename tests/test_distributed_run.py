"""Real two-process runs on CPU through the job manager: torchrun --nproc_per_node 2, gloo, a tiny LoRA job.

Both ranks train (each sees half of the data per step), the adapters are identical on both ranks (a test-only
hook, installed through ``sitecustomize`` in the ranks, writes a digest of every rank's trainable parameters),
only rank 0 writes files, checkpoints and resume work, and cancel leaves no process behind.

These start real torchrun processes (40-70 s each on the shared 2-core machine): the identical-adapters run is in
the default suite, cancel and stop/resume are marked slow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from jobs_helpers import job_manager, stop_save_then_resume, sum_rows, train_steps, wait_for, write_jsonl
from runner.jobs.supervisor import pid_alive, run_processes
from runner.spec import DatasetSpec, DistributionSpec, RunSpec

#: Installed as ``sitecustomize`` in every Python process of the run; active only in the ranks (torchrun sets
#: RANK) and only when the test asks. It wraps the recipe's cleanup to write a SHA-256 of the rank's trainable
#: parameters (names and exact bytes) before rank 0 saves the adapter.
HASH_HOOK = '''
import os
if os.environ.get("FTADVISOR_TEST_ADAPTER_HASH") and "RANK" in os.environ:
    import hashlib, json
    from pathlib import Path
    import runner.train.recipe as _recipe

    _original_cleanup = _recipe._cleanup

    def _cleanup(r):
        digest = hashlib.sha256()
        count = 0
        for name, param in sorted(r.model.named_parameters()):
            if param.requires_grad:
                digest.update(name.encode())
                digest.update(param.detach().cpu().contiguous().numpy().tobytes())
                count += param.numel()
        step = r.trainer.state.global_step if getattr(r, "trainer", None) is not None else None
        Path(r.run_dir, "adapter_hash.rank" + os.environ["RANK"] + ".json").write_text(
            json.dumps({"sha256": digest.hexdigest(), "trainable": count, "step": step}))
        return _original_cleanup(r)

    _recipe._cleanup = _cleanup
'''

#: Rows in the training file and the share held out for eval: 24 x 0.2 -> 20 train rows (runner.train.data split).
ROWS = 24
EVAL_FRACTION = 0.2
TRAIN_ROWS = 20
MICRO_BATCH = 2
NPROC = 2


@pytest.fixture
def manager(tmp_path, monkeypatch):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HASH_HOOK, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("FTADVISOR_TEST_ADAPTER_HASH", "1")
    monkeypatch.setenv("FTADVISOR_CANCEL_GRACE_S", "5")
    monkeypatch.delenv("FTADVISOR_WORKER_CMD", raising=False)
    with job_manager(tmp_path / "runs") as mgr:
        yield mgr


def _spec(tmp_path: Path, model_dir: Path, **overrides) -> RunSpec:
    data = write_jsonl(tmp_path / "train.jsonl", sum_rows(ROWS))
    fields = dict(name="two-ranks", model=str(model_dir), method="lora",
                  dataset=DatasetSpec(path=str(data), eval_fraction=EVAL_FRACTION), max_steps=4, save_steps=2,
                  micro_batch_size=MICRO_BATCH, seq_len=32, precision="fp32", device="cpu", learning_rate=1e-2,
                  distribution=DistributionSpec(nproc_per_node=NPROC, strategy="ddp"))
    fields.update(overrides)
    return RunSpec(**fields)


def _hashes(run_dir: Path) -> dict[int, dict]:
    return {rank: json.loads((run_dir / f"adapter_hash.rank{rank}.json").read_text()) for rank in range(NPROC)
            if (run_dir / f"adapter_hash.rank{rank}.json").is_file()}


def test_two_ranks_train_identical_adapters_rank0_writes(manager, tmp_path, tiny_model_dir):
    rec = manager.launch(_spec(tmp_path, tiny_model_dir))
    done = manager.wait(rec.id, timeout_s=400)
    run_dir = Path(done.output_dir)
    assert done.status == "completed", (done.reason, manager.log_tail(rec.id, 80))

    # Both ranks ran the worker and kept their own log.
    assert (run_dir / "log.rank0.txt").exists() and (run_dir / "log.rank1.txt").is_file()
    assert "Traceback" not in (run_dir / "log.rank1.txt").read_text()
    # Both ranks trained to the same parameters: DDP averages gradients, so the digests agree exactly.
    hashes = _hashes(run_dir)
    assert set(hashes) == {0, 1}, hashes
    assert hashes[0]["step"] == hashes[1]["step"] == 4 and hashes[0]["trainable"] > 0
    assert hashes[0]["sha256"] == hashes[1]["sha256"], (
        "the ranks' adapters differ: the model was not wrapped in DDP (Trainer.evaluate() before train() marks it "
        "prepared; the recipe must call runner.launch.distributed.prepare_for_training(trainer) before trainer.train())")
    # The data is split between the ranks: a step consumes micro-batch x 2 ranks rows, so after 4 steps
    # 4 * 2 * 2 = 16 of the 20 training rows are seen -> epoch 0.8 (one rank alone would be at 0.4).
    steps = train_steps(run_dir)
    assert [m.step for m in steps] == [1, 2, 3, 4]  # rank 0 alone writes metrics: no duplicate lines
    assert steps[-1].epoch == pytest.approx(4 * MICRO_BATCH * NPROC / TRAIN_ROWS)
    # Checkpoints every 2 steps; the final adapter by rank 0 equals what both ranks hold.
    assert (run_dir / "checkpoint-2").is_dir() and (run_dir / "checkpoint-4").is_dir()
    # The Trainer saves each rank's RNG state in a checkpoint: proof that both ranks took part in saving it.
    assert {p.name for p in (run_dir / "checkpoint-4").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                    "rng_state_1.pth"}
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and sum(t.numel() for t in saved.values()) == hashes[0]["trainable"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    # The engine config written next to the spec describes the same layout.
    import yaml

    acc = yaml.safe_load((run_dir / "accelerate_config.yaml").read_text())
    assert acc["num_processes"] == NPROC and acc["distributed_type"] == "MULTI_GPU"


@pytest.mark.slow
def test_two_ranks_stop_save_then_resume(manager, tmp_path, tiny_model_dir):
    """SIGUSR1 reaches both ranks; they stop at the same step with a checkpoint; resume finishes the run.

    Needs the stop decision shared by the ranks (runner.launch.distributed.any_rank in the stop callback; otherwise the
    rank that stops first leaves the other waiting in an all-reduce) and runner.launch.distributed.finish_ranks at the
    worker's exit (otherwise torchrun may SIGTERM rank 0 while it writes the checkpoint)."""
    spec = _spec(tmp_path, tiny_model_dir, max_steps=30, save_steps=100)
    run_dir, _ = stop_save_then_resume(manager, spec)
    hashes = _hashes(run_dir)
    assert hashes[0]["sha256"] == hashes[1]["sha256"] and hashes[0]["step"] == 30


@pytest.mark.slow
def test_cancel_two_ranks_leaves_no_process(manager, tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, tiny_model_dir, max_steps=10_000, save_steps=10_000)
    rec = manager.launch(spec)
    run_dir = Path(rec.output_dir)
    # Wait until both ranks are up (rank 1 has opened its log) and training has started.
    assert wait_for(lambda: (run_dir / "log.rank1.txt").is_file() and train_steps(run_dir), timeout_s=300,
                    poll_s=0.2), manager.log_tail(rec.id, 80)
    pids = run_processes(rec.id).get(rec.id) or []
    assert len(pids) >= 3  # supervisor/torchrun plus two ranks
    manager.cancel(rec.id)
    assert wait_for(lambda: not run_processes(rec.id).get(rec.id), timeout_s=60, poll_s=0.2)
    for pid in pids:
        assert not pid_alive(pid), f"process {pid} survived the cancel"  # psutil: a zombie counts as gone
    assert manager.get(rec.id).status == "cancelled"
