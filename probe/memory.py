"""Peak memory of the tensors a block of code creates, on any device, for tests and benchmarks.

``with TensorMemory() as m: ...`` sees every tensor an aten operator returns inside the block
(through a ``TorchDispatchMode``), counts each storage once while it is alive, and records the
peak of their total bytes: the *extra* memory of the block, tensors that existed before it not
counted (a view or an in-place result of an old tensor shares its storage and adds nothing).
Temporaries an operator allocates and frees inside its own kernel are not seen, nor are the zero
tangents forward-mode AD makes (``_efficientzerotensor``: no memory behind them); on CPU, where
torch keeps no allocator statistics, this is the measure of what a computation holds at once.
Slow (a Python call per operator): measure, do not time, under it.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class TensorMemory(TorchDispatchMode):
    """Peak bytes of the storages created inside the block and alive at once (``peak``; ``current`` now)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self.current = 0
        self._old: dict[int, StorageWeakRef] = {}  # storages from before the block, seen as inputs
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def _collect(self) -> None:  # forget freed storages (their addresses can be reused)
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        for key in [key for key, ref in self._old.items() if ref.expired()]:
            del self._old[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._collect()
        for t in _plain_tensors(tree_leaves((args, kwargs))):
            storage = t.untyped_storage()
            if storage._cdata not in self._live:
                self._old.setdefault(storage._cdata, StorageWeakRef(storage))
        out = func(*args, **(kwargs or {}))
        self._collect()
        for t in _plain_tensors(tree_leaves(out)):
            if t.is_meta or t._is_zerotensor():  # (no memory behind them)
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in self._old:
                continue
            self._live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    @property
    def peak_mib(self) -> float:
        return self.peak / (1 << 20)


def _plain_tensors(leaves: list) -> list[torch.Tensor]:
    """The tensors holding memory among ``leaves``: plain tensors as they are, a wrapper subclass (a DTensor: its
    local shard) by the tensors it wraps (``__tensor_flatten__``)."""
    out = []
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            continue
        if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
            out.append(t)
            continue
        names, _ = t.__tensor_flatten__()
        out.extend(_plain_tensors([getattr(t, name) for name in names]))
    return out


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 4 << 20  # bytes


def return_freed_memory_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation above ``threshold`` bytes with its own ``mmap``, unmapped when freed.

    By default glibc raises this threshold to the size of each large block freed (up to 32 MiB), after which
    blocks of that size come from the heap, which fragments and is rarely returned: a JVP of a JVP over a
    151,936-token head (temporaries of a few to 20 MB, all sizes) grew the resident set from 0.45 to 3.5 GB
    while the live tensors never exceeded 60 MB (measured with :class:`TensorMemory`). A fixed 4 MiB keeps it at
    0.46 GB at the same speed (1 MiB made the sweep 4x slower: fresh pages for every temporary). Process-wide;
    ``python -m probe`` calls it at start. Returns False where the C library is not glibc (nothing is done)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
