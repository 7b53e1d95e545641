"""Counting what a forward dispatches: aten ops and host syncs (`OpCounter`, a TorchDispatchMode).

A host sync is an op whose result the host must wait for: a scalar read back (`.item()`, `int()`,
`bool()` of a tensor: `aten._local_scalar_dense`), an op whose output shape depends on the data
(nonzero, masked_select, unique, boolean indexing, repeat_interleave without output_size),
`torch.equal`, and a blocking copy between host and device (`torch.tensor(x, device="cuda")` too).
On a GPU each one drains the launch queue, so a launch-bound forward (batch 1) pays for every one.

Seen at the dispatcher, so the count is the same on CPU and CUDA: a read of tensor data on the host
counts wherever the tensor lives (`.tolist()` of a CPU tensor dispatches nothing, so the counter
wraps it; of a CUDA tensor it is a counted copy).

    with OpCounter() as c:
        model(**batch)
    c.ops, c.syncs, c.sync_sites  # totals; where each sync came from
    c.compute_ops  # the ops that are not views (a view launches no kernel on a GPU)
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_SHAPE_FROM_DATA = {
    aten.nonzero,
    aten.masked_select,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.equal,
    aten._local_scalar_dense,
}


def _device(x):
    return x.device.type if isinstance(x, torch.Tensor) else None


def sync_reason(func, args, kwargs) -> str | None:
    """Why `func(*args, **kwargs)` makes the host wait, or None."""
    packet = func.overloadpacket
    if packet in _SHAPE_FROM_DATA:
        return packet.__name__
    if packet in (aten.index, aten.index_put, aten.index_put_):  # a boolean index is a nonzero
        idx = args[1] if len(args) > 1 else ()
        if any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx or ()):
            return f"{packet.__name__}(bool mask)"
    if packet is aten.lift_fresh and _device(args[0]) != "cpu":  # torch.tensor(data, device=...): copied from host
        return f"copy cpu->{_device(args[0])}"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor:
        if kwargs.get("output_size") is None:
            return "repeat_interleave(no output_size)"
    if packet in (aten.copy_, aten._to_copy) and not kwargs.get("non_blocking", False):
        if packet is aten.copy_:  # copy_(dst, src)
            dst, src = _device(args[0]), _device(args[1])
        else:  # _to_copy(src, *, device=None)
            src = _device(args[0])
            dst = torch.device(kwargs["device"]).type if kwargs.get("device") is not None else src
        if src != dst and "cpu" in (src, dst):
            return f"copy {src}->{dst}"
    return None


class OpCounter(TorchDispatchMode):
    """Counts aten ops and host syncs dispatched inside the `with` block (autograd's too, if any).

    ops / syncs: totals; by_op / by_sync: Counters by op name; sync_sites: Counter of
    (reason, "file:line function") for the innermost frame outside torch, when `sites` is True."""

    def __init__(self, sites: bool = True):
        super().__init__()
        self.sites = sites
        self.by_op: collections.Counter = collections.Counter()
        self.views = 0
        self.by_sync: collections.Counter = collections.Counter()
        self.sync_sites: collections.Counter = collections.Counter()

    @property
    def ops(self) -> int:
        return sum(self.by_op.values())

    @property
    def compute_ops(self) -> int:
        return self.ops - self.views

    @property
    def syncs(self) -> int:
        return sum(self.by_sync.values())

    def __enter__(self):
        own = torch.Tensor.__dict__.get("tolist")  # usually inherited from the C base class
        self._saved_tolist = own
        inner = torch.Tensor.tolist

        def tolist(t):
            if t.device.type == "cpu":  # elsewhere the device-to-host copy is dispatched and counted
                self._count_sync("tolist")
            return inner(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        if self._saved_tolist is None:
            del torch.Tensor.tolist
        else:
            torch.Tensor.tolist = self._saved_tolist
        return super().__exit__(*exc)

    def _count_sync(self, reason):
        self.by_sync[reason] += 1
        if self.sites:
            self.sync_sites[(reason, _caller())] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.by_op[func.overloadpacket.__name__] += 1
        self.views += func.is_view
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            self._count_sync(reason)
        return func(*args, **kwargs)

    def summary(self) -> dict:
        return {
            "ops": self.ops,
            "compute_ops": self.compute_ops,
            "syncs": self.syncs,
            "by_sync": dict(self.by_sync),
            "sync_sites": {f"{r} @ {site}": n for (r, site), n in self.sync_sites.items()},
        }


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("pipeline/eval/opcount.py"):
            return f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"
