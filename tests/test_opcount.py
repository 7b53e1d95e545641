"""The op / host-sync counter (pipeline/eval/opcount.py) and the pruning step's sync budget: at most one
host sync per pruning point (the new sequence length), whatever selects the tokens."""

import pytest
import torch

from pipeline.eval.opcount import OpCounter, count_launches

from tiny_models import make_batch, tiny_atp


def test_counter_sees_each_kind_of_sync_and_nothing_else():
    x = torch.randn(5, 4)
    with OpCounter() as c:
        (x + 1).relu().sum(0)  # no sync
    assert c.syncs == 0 and c.ops == 3
    with OpCounter() as c:
        int(x.sum())
        bool(x.any())
        x[x > 0]
        torch.nonzero(x)
        torch.equal(x, x)
        torch.repeat_interleave(torch.ones(3, dtype=torch.long))
        x.tolist()
    assert dict(c.by_sync) == {
        "_local_scalar_dense": 2,
        "index(bool mask)": 1,
        "nonzero": 1,
        "equal": 1,
        "repeat_interleave(no output_size)": 1,
        "tolist": 1,
    }
    assert all(site.startswith("tests/test_opcount.py:") for _, site in c.sync_sites)
    assert "tolist" not in torch.Tensor.__dict__  # the wrapper is gone after the block


def test_launch_count_skips_views_and_counts_a_copy_under_a_view_op():
    """`count_launches` (what compiled forwards are compared by): top-level aten ops that run a
    kernel; a view is none, an op that may alias counts only when it copies."""
    x = torch.randn(5, 4)

    def fn():
        y = x.unsqueeze(0) * 2 + 1  # a view, then two kernels
        y.to(torch.float32)  # the same dtype: returns y, no kernel
        y.to(torch.float64)  # a copy: one kernel
        return y[0].t().contiguous()  # two views, then a copy

    c = count_launches(fn)
    assert (c["ops"], c["views"], c["kernels"], c["launches"]) == (8, 4, 0, 4), c


def _counts(m, batch, pruning, train=False):
    m.config.pruning = pruning
    m.train(train)
    with torch.set_grad_enabled(train), OpCounter() as c:
        if train:
            m(**batch)
        else:
            m(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=1)
    return c


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("atp_layers,extended", [((2, 4), False), ((0, 2, 4), True)], ids=["paper", "extended"])
def test_a_pruned_forward_syncs_at_most_once_per_pruning_point(padding, atp_layers, extended):
    kw = dict(score_self="duplication", merge="nearest") if extended else {}
    _, m = tiny_atp(atp_layers=atp_layers, fixed_counts=[10, 6, 3][-len(atp_layers) :], **kw)
    batch = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], padding=padding, seed=1, text_only=(1,))
    _counts(m, batch, "atp")  # warm-up: the spatial grid scores are built once, on the host
    base = _counts(m, batch, "none")
    assert base.syncs <= 1, base.summary()  # the input checks and the query count, read together
    for pruning in ("atp", "fixed"):
        c = _counts(m, batch, pruning)
        assert c.syncs - base.syncs <= len(atp_layers), (pruning, c.summary())
        at_points = sum(n for (_, site), n in c.sync_sites.items() if site.endswith(" point"))
        assert at_points == len(atp_layers), c.summary()  # the new lengths, once per point
    # soft masks: nothing changes length, so the pruning points read nothing back (the budget losses,
    # computed with pruning only, read whether the batch holds an image)
    soft, soft_base = _counts(m, batch, "atp", train=True), _counts(m, batch, "none", train=True)
    outside_losses = sum(n for (_, site), n in soft.sync_sites.items() if not site.endswith(" _losses"))
    assert outside_losses <= soft_base.syncs, soft.summary()
