"""QLoRA on MoE models: quantize the fused experts that bitsandbytes' loader leaves in 16/32-bit.

transformers 5 fuses each layer's routed experts into 3D parameters, which ``load_in_4bit`` does not quantize
(see ``estimator/experts.py``). Each expert matrix becomes one bitsandbytes ``Linear4bit`` (NF4, double
quantization, the run's compute dtype), quantized from the loaded weights, so the experts are stored exactly as
bitsandbytes stores any quantized Linear and the estimator counts them the same way.

Two steps, both used by ``recipe._build_qlora``:

- :func:`quantize_experts_while_loading` wraps ``from_pretrained``: the moment the loader sets a layer's fused
  tensor, it is quantized where it landed and the module keeps a meta placeholder, so the 16-bit experts are
  never all on the GPU at once (loading Mixtral-8x7B would otherwise hold its 87 GiB of bf16 experts);
- :func:`quantize_fused_experts` then swaps each fused module for ``estimator.experts.NF4Experts`` built from
  those 4-bit Linears (or quantizes now, for a model loaded without the first step).
"""

from __future__ import annotations

from contextlib import contextmanager


def _linear_factory(compute_dtype, quant_storage=None):
    """``make_linear(d_in, d_out, weight_2d)``: one NF4 ``Linear4bit`` quantized from ``weight_2d`` on its device
    (bitsandbytes quantizes a ``Params4bit`` when it is moved to a device)."""
    import bitsandbytes as bnb
    import torch

    if isinstance(quant_storage, str):  # BitsAndBytesConfig takes the dtype's name (runner/launch/distributed.py)
        quant_storage = getattr(torch, quant_storage)

    def make_linear(d_in: int, d_out: int, weight):
        device = weight.device
        kwargs = {"quant_storage": quant_storage} if quant_storage is not None else {}
        lin = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                                quant_type="nf4", device="meta", **kwargs)
        data = weight.detach()
        lin.weight = bnb.nn.Params4bit(data.contiguous().cpu() if device.type == "meta" else data.contiguous(),
                                       requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       quant_storage=kwargs.get("quant_storage", torch.uint8), module=lin)
        return lin.to(device)

    return make_linear


def quantize_fused_experts(model, compute_dtype, quant_storage=None) -> tuple[int, list[str]]:
    """Swap the fused experts of ``model`` (loaded with ``load_in_4bit``) for 4-bit per-expert Linears.

    Matrices :func:`quantize_experts_while_loading` already quantized are used as they are; the others are
    quantized now, where their weights are. Returns the number of experts modules swapped and why any was left
    as it was.
    """
    import torch

    from estimator.experts import replace_fused_experts

    with torch.no_grad():
        return replace_fused_experts(model, _linear_factory(compute_dtype, quant_storage))


@contextmanager
def quantize_experts_while_loading(compute_dtype, quant_storage=None):
    """While the block runs, quantize every fused experts tensor as soon as a module receives it.

    transformers 5's loader sets each converted tensor with ``setattr(module, name, Parameter)``
    (``core_model_loading.set_param_for_module``), which runs torch's global parameter-registration hooks
    (``torch.nn.modules.module.register_module_parameter_registration_hook``, public since torch 2.0). The hook
    quantizes a fused experts tensor (``estimator.experts.FUSED_UP`` / ``FUSED_DOWN`` on a module
    ``estimator.experts.fused_experts`` recognizes and ``NF4Experts`` supports) into one NF4 Linear per expert,
    on the device it was loaded to, keeps them on the module (``estimator.experts.PREQUANTIZED``) and registers
    a meta placeholder of the same shape instead. The loader drops the 16-bit tensor on its next step, so the
    load peak is one layer's conversion on top of the 4-bit weights (``estimator.memory.moe_qlora_load_peak_bytes``).
    Every other parameter, and meta ones (the empty model being built), pass unchanged.
    """
    import torch
    from torch.nn.modules.module import register_module_parameter_registration_hook

    from estimator.experts import FUSED_DOWN, FUSED_UP, PREQUANTIZED, quantize_fused_tensor, unsupported_reason

    make_linear = _linear_factory(compute_dtype, quant_storage)

    def hook(module, name, param):
        if (name not in FUSED_UP + (FUSED_DOWN,) or param is None or getattr(param, "ndim", 0) != 3
                or param.device.type == "meta" or not hasattr(module, "has_gate") or unsupported_reason(module)):
            return None
        with torch.no_grad():
            linears = quantize_fused_tensor(module, param, make_linear)
        module.__dict__.setdefault(PREQUANTIZED, {})[name] = linears
        placeholder = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                         requires_grad=False)
        placeholder._is_hf_initialized = True  # as the loader marks what it set: not re-initialized after the load
        return placeholder

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()
