"""Multi-GPU QLoRA: each rank loads its 4-bit model onto its own GPU.

bitsandbytes' loader in transformers places the model on ``torch.cuda.current_device()`` when no device_map is
given (``Bnb4BitHfQuantizer.update_device_map``), and the runner builds the model before the Trainer's accelerate
state sets the rank's device; so the recipe binds ``LOCAL_RANK`` first (``recipe.bind_local_gpu``). No GPU here:
CUDA's two calls are stood in for, everything else is the real code, transformers' quantizer included.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda with a current device that set_device moves, as CUDA's runtime does (patched after the
    libraries are imported: bitsandbytes picks its backend from torch.cuda at import)."""
    pytest.importorskip("bitsandbytes")
    import transformers.quantizers.quantizer_bnb_4bit  # noqa: F401

    import runner.spec  # noqa: F401
    import runner.train.recipe  # noqa: F401

    state = {"current": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: state.__setitem__("current", int(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    return state


def test_each_rank_loads_its_4bit_model_on_its_own_gpu(monkeypatch, fake_cuda):
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer

    from runner.spec import DatasetSpec, RunSpec
    from runner.train.recipe import _device

    quantizer = Bnb4BitHfQuantizer(BitsAndBytesConfig(load_in_4bit=True))
    assert quantizer.update_device_map(None) == {"": 0}  # what every rank got before
    monkeypatch.setenv("LOCAL_RANK", "3")
    spec = RunSpec(model="x", method="qlora", dataset=DatasetSpec(path="d.jsonl"))
    assert _device(spec) == "cuda"
    assert fake_cuda["current"] == 3
    assert quantizer.update_device_map(None) == {"": 3}  # the 4-bit load now lands on rank 3's GPU


def test_one_process_keeps_the_default_gpu(monkeypatch, fake_cuda):
    from runner.spec import DatasetSpec, RunSpec
    from runner.train.recipe import bind_local_gpu, _device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert bind_local_gpu() is None
    assert _device(RunSpec(model="x", method="lora", dataset=DatasetSpec(path="d.jsonl"))) == "cuda"
    assert fake_cuda["current"] == 0
    cpu = RunSpec(model="x", method="lora", dataset=DatasetSpec(path="d.jsonl"), device="cpu")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _device(cpu) == "cpu" and fake_cuda["current"] == 0  # a CPU run never touches CUDA
