"""QLoRA on MoE models: quantize the fused experts that bitsandbytes' loader leaves in 16/32-bit.

transformers 5 fuses each layer's routed experts into 3D parameters, which ``load_in_4bit`` does not quantize
(see ``estimator/experts.py``). ``quantize_fused_experts`` replaces every such module with
``estimator.experts.NF4Experts``: one bitsandbytes ``Linear4bit`` (NF4, double quantization, the run's
compute dtype) per expert and matrix, quantized from the loaded weights, so the experts are stored exactly as
bitsandbytes stores any quantized Linear and the estimator counts them the same way.
"""

from __future__ import annotations


def quantize_fused_experts(model, compute_dtype, quant_storage=None) -> tuple[int, list[str]]:
    """Swap the fused experts of ``model`` (loaded with ``load_in_4bit``) for 4-bit per-expert Linears.

    Quantization runs where the expert weights already are (bitsandbytes quantizes a ``Params4bit`` when it is
    moved to a device). Returns the number of experts modules quantized and why any was left as it was.
    """
    import bitsandbytes as bnb
    import torch

    from estimator.experts import replace_fused_experts

    if isinstance(quant_storage, str):  # BitsAndBytesConfig takes the dtype's name (runner/launch/distributed.py)
        quant_storage = getattr(torch, quant_storage)
    def make_linear(d_in: int, d_out: int, weight):
        device = weight.device
        kwargs = {"quant_storage": quant_storage} if quant_storage is not None else {}
        lin = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=compute_dtype, compress_statistics=True,
                                quant_type="nf4", device="meta", **kwargs)
        data = weight.detach().to(torch.float32 if weight.dtype == torch.float32 else weight.dtype)
        lin.weight = bnb.nn.Params4bit(data.contiguous().cpu() if device.type == "meta" else data.contiguous(),
                                       requires_grad=False, quant_type="nf4", compress_statistics=True,
                                       quant_storage=kwargs.get("quant_storage", torch.uint8), module=lin)
        return lin.to(device)

    with torch.no_grad():
        swapped, skipped = replace_fused_experts(model, make_linear)
    return swapped, skipped
