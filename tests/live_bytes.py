"""Measure the bytes a block of real PyTorch code holds at its peak, on the CPU, as a GPU allocator would count them.

``LiveBytes`` is a ``TorchDispatchMode``: after every op it records the storages the op produced and sums those
still alive (``StorageWeakRef``), keeping the largest sum. An op's inputs are alive while it runs, so the peak
of every stack, concatenation or copy is seen. Tensors that no op produced (a safetensors slice read from the
file, which on a GPU run lives in host memory) are not counted; their copies to the load dtype are, as the
GPU would hold them. Temporaries inside a single C++ kernel are not seen.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as live: ...`` then ``live.peak`` (bytes) and ``live.peak_op`` (the op at the peak)."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, tuple[StorageWeakRef, int]] = {}  # data_ptr -> (weak ref, bytes)
        self.peak = 0
        self.peak_op = ""

    def live(self) -> int:
        total = 0
        for ptr, (ref, nbytes) in list(self._refs.items()):
            if ref.expired():
                del self._refs[ptr]
            else:
                total += nbytes
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                known = self._refs.get(storage.data_ptr())
                if storage.nbytes() and (known is None or known[0].expired()):
                    self._refs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        now = self.live()
        if now > self.peak:
            self.peak, self.peak_op = now, str(func)
        return out
