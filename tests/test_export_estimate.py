"""``ftadvisor export --gpu ID`` writes the spec's per-GPU estimate into the bundle's README, through the same
spec -> request mapping as the app and the advisor (runner/estimate_request.py), so the figure is the bundle's run.
"""

from __future__ import annotations

from ftadvisor.cli import main as cli_main
from runner.spec import DatasetSpec, RunSpec

GIB = 2**30


def test_export_readme_carries_the_estimate_of_the_spec(tmp_path, capsys):
    from estimator import estimate
    from runner.estimate_request import estimate_request

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    spec = RunSpec(model="smollm2-135m", method="lora", micro_batch_size=2, gradient_accumulation_steps=8,
                   seq_len=256, dataset=DatasetSpec(path=str(data)),
                   distribution=dict(nproc_per_node=2, strategy="zero3"))
    spec_path = tmp_path / "spec.json"
    spec.save(spec_path)
    assert cli_main(["export", str(spec_path), "--output", str(tmp_path / "out"), "--gpu", "rtx-4090"]) == 0
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    est = estimate(estimate_request(spec, gpu="rtx-4090"))
    assert est.request.grad_accum_steps == 8 and est.request.sharding == "zero3" and est.request.num_gpus == 2
    assert "## Memory estimate" in readme
    assert f"peak {est.memory.peak_bytes / GIB:.1f} GiB per GPU" in readme and "2 x NVIDIA GeForce RTX 4090" in readme


def test_export_with_an_unknown_gpu_is_refused_before_writing(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    spec_path = tmp_path / "spec.json"
    RunSpec(model="smollm2-135m", dataset=DatasetSpec(path=str(data))).save(spec_path)
    assert cli_main(["export", str(spec_path), "--output", str(tmp_path / "out"), "--gpu", "no-such-gpu"]) == 2
    assert "no-such-gpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
