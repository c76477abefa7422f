"""FSDP's per-GPU bytes against a REAL two-process FSDP2 step on CPU (gloo), independent of the estimator.

Each rank wraps a tiny Llama the way accelerate's ``fsdp2_prepare_model`` does (``fully_shard`` on every decoder
layer, the tail [final norm, LM head] with ``reshard_after_forward=False``, the embedding, then the root), runs one
forward + backward + AdamW step and sums the bytes of its local shards: parameters (``DTensor.to_local()``),
gradients and optimizer states (``step`` counters excluded: CPU scalars on a GPU run). The estimate of the same
run (``sharding="fsdp"``, 2 GPUs) must say the same bytes per GPU for weights, gradients and optimizer states.

Regimes: pure bf16 (a bf16 model without mixed precision: accelerate does not upcast it), fp32 master weights
(fp32 shards gathered in bf16 by ``MixedPrecisionPolicy(param_dtype=bf16)``, as accelerate sets up mixed
precision), and LoRA with the frozen base in bf16 beside fp32 adapters (FSDP2 only asks the *trainable*
parameters of a group to share one dtype).
"""

from __future__ import annotations

import contextlib
import json
import sys
import types
import warnings

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from estimator import estimate  # noqa: E402
from estimator.request import EstimateRequest  # noqa: E402
from jobs_helpers import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed for a two-process FSDP step")

WORLD = 2


def _config():
    from transformers import LlamaConfig

    # every dim 0 even: FSDP2 pads dim 0 to a multiple of the world size, so shards are exact halves here
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=False)


@contextlib.contextmanager
def _plain_main():
    """An empty ``__main__`` while the ranks start. ``mp.spawn`` re-runs the parent's ``__main__`` in each child;
    after an AppTest in the same session that is Streamlit's temporary page script, which fails outside AppTest
    (``NameError: __args``, seen in a full run). The ranks need nothing from it: ``_rank`` is imported by name."""
    saved = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = saved


REGIMES = ("pure-bf16", "fp32-master", "lora")


def _rank(rank: int, port: int, out: str) -> None:
    """One rank: every regime in turn on the same process group, one JSON report per regime."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for regime in REGIMES:
            with open(f"{out}.{regime}.{rank}", "w") as fh:
                json.dump(_one_step(rank, regime), fh)
    finally:
        dist.destroy_process_group()


def _one_step(rank: int, regime: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    if regime == "pure-bf16":
        model = model.to(torch.bfloat16)
        policy = MixedPrecisionPolicy()  # no mixed precision: parameters stay as loaded
    elif regime == "fp32-master":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    else:  # lora: bf16 frozen base, fp32 adapters (peft autocast_adapter_dtype), gathered in bf16
        from tests.test_memory_exact import with_lora

        model = with_lora(model.to(torch.bfloat16))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    mesh = init_device_mesh("cpu", (WORLD,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(base.model.embed_tokens, mesh=mesh, mp_policy=policy)
    fully_shard([base.model.norm, base.lm_head], mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, foreach=False)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    return {
        "weights": sum(nbytes(p) for p in model.parameters()),
        "gradients": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(nbytes(v) for st in opt.state.values() for k, v in st.items()
                         if torch.is_tensor(v) and k != "step"),
        "dtypes": sorted({str(local(p).dtype) for p in model.parameters()}),
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, list[dict]]:
    """Per regime, the two ranks' reports of one real FSDP2 step (one spawn of two processes for all)."""
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("fsdp") / "rank")
    with warnings.catch_warnings(), _plain_main():
        warnings.simplefilter("ignore")
        mp.spawn(_rank, args=(free_port(), out), nprocs=WORLD, join=True)
    return {g: [json.loads(open(f"{out}.{g}.{r}").read()) for r in range(WORLD)] for g in REGIMES}


def _estimate(tmp_path, **kw):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config().to_dict()))
    req = EstimateRequest(model=str(path), batch_size=2, seq_len=16, gpu="a100-80gb", num_gpus=WORLD,
                          sharding="fsdp", dropout=0.0, **kw)
    return estimate(req).memory


@pytest.mark.parametrize("regime,kw", [
    ("pure-bf16", dict(method="full", dtype="bf16", master_dtype="bf16")),
    ("fp32-master", dict(method="full", dtype="bf16", master_dtype="fp32")),
    ("lora", dict(method="lora", dtype="bf16", rank=8, alpha=16, targets="attention-qv")),
])
def test_fsdp_shards_match_a_real_two_process_step(tmp_path, real, regime, kw):
    mem = _estimate(tmp_path, **kw)
    from transformers import LlamaForCausalLM

    # buffers (rotary inv_freq, fp32 as transformers creates them) are replicated: FSDP shards parameters only
    buffers = sum(b.numel() * b.element_size() for b in LlamaForCausalLM(_config()).buffers())
    ranks = real[regime]
    for r in ranks:
        assert mem.weights_bytes - buffers == r["weights"], (regime, r)
        assert mem.gradients_bytes == r["gradients"], (regime, r)
        assert mem.optimizer_bytes == r["optimizer"], (regime, r)
    if regime == "pure-bf16":
        assert ranks[0]["dtypes"] == ["torch.bfloat16"]
    elif regime == "fp32-master":
        assert ranks[0]["dtypes"] == ["torch.float32"]
    else:
        assert ranks[0]["dtypes"] == ["torch.bfloat16", "torch.float32"]
