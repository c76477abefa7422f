"""QLoRA's frozen weights as bitsandbytes stores them: NF4 with double quantization.

``nf4_linear_bytes`` is the exact storage of one quantized Linear (``estimator/memory.py`` counts QLoRA weights
with it); ``nf4_linear_cls`` is the stand-in module the trace swaps in for each frozen Linear: it stores exactly
those tensors and runs the same ops as bitsandbytes' training path on CUDA (dequantize to the compute dtype,
``F.linear``, save only the packed weight for backward). Light to import: torch loads on first use.
"""

from __future__ import annotations

import functools
import math

# bitsandbytes NF4 with double quantization (Dettmers et al. 2023; bitsandbytes 0.50 storage, measured
# exact in shared/REFERENCE.md): 64 weights per block, 256 blocks per nested block.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * 4  # the 16-entry NF4 code table, fp32
NF4_OFFSET_BYTES = 4  # the fp32 mean subtracted from the 8-bit absmax
NF4_NESTED_CODE_BYTES = 256 * 4  # the 256-entry dynamic code of the nested quantization, fp32


def nf4_linear_bytes(n: int) -> int:
    """Bytes bitsandbytes stores for one NF4, double-quantized Linear weight of ``n`` elements.

    packed 4-bit weight + uint8 absmax per 64 + fp32 nested absmax per 256 blocks + code tables and offset
    (REFERENCE.md: 4096x4096 -> 8,655,940 B).
    """
    blocks = math.ceil(n / NF4_BLOCK)
    return (math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)
            + NF4_CODE_BYTES + NF4_OFFSET_BYTES + NF4_NESTED_CODE_BYTES)


@functools.lru_cache(maxsize=1)
def nf4_linear_cls():
    import torch

    class _Dequant4bitMatmul(torch.autograd.Function):
        """bitsandbytes 0.50 ``MatMul4Bit`` on CUDA for training-size inputs: dequantize, ``F.linear``; saves
        only the packed weight and dequantizes again for the input gradient.

        ``keeps_input``: bitsandbytes before 0.43.2 (PR #1270, "fix QLoRA mem bug: delete useless buffered
        activation", 2024-07-16) also kept the input ``A`` as a plain ctx attribute (``ctx.tensors = (A, B)``),
        which the backward never uses: not a saved tensor, so it lives as long as the autograd node does."""

        @staticmethod
        def forward(ctx, x, packed, absmax8, offset, shape, dtype, keeps_input=False):
            w = _dequant(absmax8, offset, shape, dtype)
            ctx.save_for_backward(packed, absmax8, offset)
            ctx.shape = shape
            if keeps_input and any(ctx.needs_input_grad[:2]):
                ctx.tensors = (x, packed)  # bitsandbytes < 0.43.2
            return torch.nn.functional.linear(x, w)

        @staticmethod
        def backward(ctx, grad):
            packed, absmax8, offset = ctx.saved_tensors
            w = _dequant(absmax8, offset, ctx.shape, grad.dtype)
            return torch.matmul(grad, w), None, None, None, None, None, None

    def _dequant(absmax8, offset, shape, dtype):
        # bitsandbytes' default gemm_4bit path: dequantize_blockwise(absmax8) -> fp32 per 64-block, + offset
        # (a second fp32 tensor), then dequantize_4bit -> the weight in the compute dtype (values do not matter)
        scales = torch.empty(absmax8.shape, dtype=torch.float32, device=absmax8.device) + offset
        w = torch.empty(shape, dtype=dtype, device=absmax8.device)
        del scales
        return w

    class NF4Linear(torch.nn.Module):
        """Frozen Linear stored as bitsandbytes stores NF4 + double quantization; forward as ``Linear4bit``."""

        def __init__(self, in_features, out_features, bias, compute_dtype):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            n = in_features * out_features
            blocks = math.ceil(n / NF4_BLOCK)
            self.compute_dtype = compute_dtype
            meta = torch.device("meta")
            self.weight = torch.nn.Parameter(torch.empty(math.ceil(n / 2), 1, dtype=torch.uint8, device=meta),
                                             requires_grad=False)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=meta))
            self.register_buffer("nested_absmax", torch.empty(math.ceil(blocks / NF4_NESTED_BLOCK),
                                                              dtype=torch.float32, device=meta))
            self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=meta))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=meta))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, device=meta))
            self.bias = bias
            self.keeps_input = False  # bitsandbytes < 0.43.2 keeps the input A (see _Dequant4bitMatmul)

        @property
        def W_q(self):  # noqa: N802 - peft's dequantize_module_weight calls ``dequantize()`` when this exists
            return self.weight

        def dequantize(self):
            """What DoRA's weight norm gets from bitsandbytes' ``dequantize_4bit``: the full weight in the dtype
            it was loaded in (fp32 for the runner), after an fp32 absmax temporary."""
            scales = torch.empty(self.absmax.shape, dtype=torch.float32, device=self.absmax.device) + self.offset
            w = torch.empty((self.out_features, self.in_features), dtype=torch.float32, device=self.absmax.device)
            del scales
            return w

        def forward(self, x):
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            out = _Dequant4bitMatmul.apply(x, self.weight, self.absmax, self.offset,
                                           (self.out_features, self.in_features), self.compute_dtype,
                                           self.keeps_input)
            if bias is not None:
                out = out + bias
            return out.to(inp_dtype)

    return NF4Linear


def nf4_linear(linear, compute_dtype):
    """The NF4 stand-in of a frozen ``nn.Linear`` (its bias kept, frozen)."""
    bias = linear.bias
    if bias is not None:
        bias.requires_grad_(False)
    return nf4_linear_cls()(linear.in_features, linear.out_features, bias, compute_dtype)


def quantize_frozen_linears(peft_model, compute_dtype, keeps_input: bool = False) -> None:
    """Swap every frozen ``nn.Linear`` (not the LM head) for an NF4 stand-in computing in ``compute_dtype``,
    wrapped as peft wraps bnb layers; ``keeps_input``: as bitsandbytes < 0.43.2 (its MatMul4Bit keeps its input)."""
    import torch
    from peft.tuners.lora import bnb as lora_bnb

    head = peft_model.get_output_embeddings() if hasattr(peft_model, "get_output_embeddings") else None
    for name, mod in list(peft_model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not torch.nn.Linear or child is head or child_name.startswith("lora_"):
                continue
            if child.weight.requires_grad:
                continue
            stand_in = nf4_linear(child, compute_dtype)
            stand_in.keeps_input = keeps_input
            setattr(mod, child_name, stand_in)
    for mod in peft_model.modules():
        if type(mod).__name__ == "Linear" and hasattr(mod, "lora_A") and isinstance(mod.base_layer, nf4_linear_cls()):
            mod.__class__ = lora_bnb.Linear4bit
