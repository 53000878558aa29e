"""Every tensor counted while alive: what a training step really holds on any device, without a GPU. bench/memory.py
measures a CPU step with it, and tests check studykit.memory's estimate against it."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


class TensorMemoryPeak(TorchDispatchMode):
    """The most bytes tensors held at once while inside, on any device: `already_alive` (the weights) count from the
    start, every tensor made inside from its first op until its storage is freed. What a step really keeps, without
    a GPU; the allocator's rounding and the CUDA context are not in it."""

    def __init__(self, already_alive=()) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        for tensor in already_alive:
            self._count(tensor)
        self.peak = self.current

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.alive:
            self.alive[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for key in [key for key, (storage, _) in self.alive.items() if storage.expired()]:
            self.current -= self.alive.pop(key)[1]
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor)
        self.peak = max(self.peak, self.current)
        return result
