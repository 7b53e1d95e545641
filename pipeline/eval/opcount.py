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


def count_launches(fn) -> dict:
    """What the host issues in `fn()`, compiled graphs included (an `OpCounter` sees none of their
    work: dynamo runs eagerly under a dispatch mode), from torch.profiler's events:

    - `ops`: the top-level aten ops, one per call into ATen from Python or from a compiled graph's
      wrapper (an op's own sub-ops run under it);
    - `kernels`: inductor's fused kernels. On CPU the profiler sees them only when they were compiled
      with `options={"cpp.enable_kernel_profile": True}` (`KERNEL_PROFILE`);
    - `views`: those of the ops that ran no kernel, only views (on a GPU they cost host time only);
    - `launches` = ops - views + kernels, the count to compare between eager and compiled forwards;
    - `by_name`: the launches by aten op ("fused kernel" for inductor's);
    - on CUDA also `device_kernels`, the kernels the GPU ran."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    counts, names = collections.Counter(), collections.Counter()

    def walk(event):
        if event.name.startswith("aten::"):
            counts["ops"] += 1
            counts["views"] += _launches_nothing(event)
            names[event.name] += 1
        elif "fused" in event.name and event.name.startswith(("graph_", "cpp_", "triton_")):
            counts["kernels"] += 1
            names["fused kernel"] += 1
        else:  # a profiler range (dynamo's cache lookup, a compiled graph's call): what it runs counts
            for child in event.cpu_children:
                walk(child)

    events = prof.events()
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CPU and event.cpu_parent is None:
            walk(event)
    out = {k: counts[k] for k in ("ops", "views", "kernels")}
    out["launches"] = counts["ops"] - counts["views"] + counts["kernels"]
    out["by_name"] = dict(names)
    if torch.cuda.is_available():
        out["device_kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


def _launches_nothing(event) -> bool:
    """Whether a profiled aten op ran no kernel: a view, and so are all the aten ops under it (`to`,
    `reshape` and `contiguous` may return their input or copy it: a copy shows as a sub-op)."""
    if not _is_view(event.name):
        return False
    return all(_launches_nothing(c) for c in event.cpu_children if c.name.startswith("aten::"))


def _is_view(name: str) -> bool:
    """Whether the aten op named `name` ("aten::unsqueeze") returns a view of its input."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    return packet is not None and any(getattr(packet, o).is_view for o in packet.overloads())


KERNEL_PROFILE = {"cpp.enable_kernel_profile": True}  # torch.compile options: fused CPU kernels visible to the profiler
