"""The `ftadvisor models|gpus|estimate` command line: JSON keys, readable text, exit 2 on bad input."""

from __future__ import annotations

import json

import pytest

from ftadvisor.cli import main

# ``--json`` nests its objects with the Estimate model's own field names (README, "Command line").
JSON_PATHS = [
    "model.id", "model.total_params", "model.trainable_params", "model.breakdown.embeddings", "method",
    "memory.weights_bytes", "memory.gradients_bytes", "memory.optimizer_bytes", "memory.activations_bytes",
    "memory.overhead_bytes", "memory.peak_bytes", "memory.peak_phase", "gpu.id", "gpu.count", "gpu.memory_bytes",
    "fits", "adapter_bytes", "checkpoint_bytes", "compute.flops", "compute.hours", "compute.gpu_hours",
    "compute.cost_usd", "request.sharding", "request.rank", "storage.adapter_bytes", "notes",
]


def _at(data: dict, path: str):
    for part in path.split("."):
        data = data[part]
    return data


def test_estimate_json_nests_the_estimate(capsys):
    rc = main(["estimate", "--model", "smollm2-135m", "--method", "lora", "--rank", "8", "--seq-len", "128",
               "--examples", "1000", "--tokens-per-example", "128", "--epochs", "2", "--gpu", "l4", "--json"])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    missing = []
    for path in JSON_PATHS:
        try:
            _at(data, path)
        except (KeyError, TypeError):
            missing.append(path)
    assert not missing, missing
    assert not [k for k in data if "." in k]  # no flat dotted keys left
    assert data["model"]["total_params"] == 134_515_008  # SmolLM2-135M (REFERENCE.md)
    assert data["gpu"]["id"] == "l4" and data["fits"] is True
    assert data["compute"]["gpu_hours"] > 0 and data["compute"]["cost_usd"] > 0
    assert data["memory"]["peak_phase"] in ("forward/loss end", "backward", "optimizer step")
    assert data["request"]["rank"] == 8 and data["storage"]["adapter_bytes"] == data["adapter_bytes"]
    # the same key names as the pydantic model, so the JSON reads back into it
    from estimator import Estimate

    assert Estimate.model_validate(data).memory.peak_bytes == data["memory"]["peak_bytes"]


def test_estimate_text_is_a_table(capsys):
    rc = main(["estimate", "--model", "smollm2-135m", "--method", "qlora", "--seq-len", "128", "--tokens", "1000000"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("weights", "gradients", "optimizer states", "activations (traced)", "PEAK", "fits", "cost",
                 "notes:"):
        assert word in out


def test_models_and_gpus_lists(capsys):
    assert main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert {"llama-3.1-405b", "smollm2-135m", "gpt3-175b"} <= {m["id"] for m in models}
    assert main(["gpus", "--json"]) == 0
    gpus = json.loads(capsys.readouterr().out)
    assert {"t4", "a100-80gb", "h100-80gb", "b200"} <= {g["id"] for g in gpus}
    assert main(["gpus"]) == 0
    assert "a100-80gb" in capsys.readouterr().out


@pytest.mark.parametrize("args,flag", [
    (["--rank", "0"], "--rank"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "1000000000"], "--seq-len"),
    (["--gpu", "h900"], "gpu"),
    (["--model", "gpt5-ultra"], "model"),
])
def test_bad_input_exits_2_naming_the_field(capsys, args, flag):
    argv = ["estimate", "--model", "smollm2-135m"] + args
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_malformed_config_exits_2(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64')  # truncated JSON
    assert main(["estimate", "--model", str(path)]) == 2
    assert "config" in capsys.readouterr().err.lower()
