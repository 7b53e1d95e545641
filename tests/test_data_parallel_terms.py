"""The ATP training terms that read the whole batch under data parallelism (2 gloo processes, each with
a slice of one batch): the dual prices (METHOD sec 15) and the value terms' advantages (sec 16) are
the global batch's, as one process with all of it computes them, and a rank with fewer than two image
samples still runs the value passes with the others (under ZeRO-3 a rank that skipped them would hang
the weight gathers)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny_models import make_batch, tiny_atp

# 5 samples, the last text-only: rank 0 takes three image samples, rank 1 one image sample and the
# text-only one (fewer than two image samples of its own)
PRE, SUF, ANS, TEXT_ONLY = [3, 2, 4, 1, 2], [4, 5, 2, 3, 3], [3, 2, 2, 1, 2], (4,)
SLICES = [slice(0, 3), slice(3, 5)]
ATP = dict(budget_loss="dual", lambda_atp=0.0, dual_lr=0.5, marginal_weight=1.0, marginal_center="own")


def _batch():
    b = make_batch(PRE, SUF, answers=ANS, seed=3, text_only=TEXT_ONLY)
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}


def _slice(b, s):
    # pixel_values hold one image per image sample, in sample order
    img = [i for i in range(len(PRE)) if i not in TEXT_ONLY]
    rows = [img.index(i) for i in range(s.start, s.stop) if i in img]
    out = {k: v[s] for k, v in b.items() if k != "pixel_values"}
    out["pixel_values"] = b["pixel_values"][rows]
    return out


def _step(model, batch):
    """One training forward: its losses, the prices after it and how many value passes it ran."""
    passes = []
    fixed_pass = model._fixed_pass
    model._fixed_pass = lambda *a, **k: passes.append(1) or fixed_pass(*a, **k)
    out = model(**batch)
    return {k: v.item() for k, v in out.atp_losses.items()}, model._price.tolist(), len(passes)


def _worker(rank, world, init, q):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        _, m = tiny_atp(**ATP)
        m.train()
        q.put((rank, _step(m, _slice(_batch(), SLICES[rank]))))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_price_and_standardise_as_one_process_with_the_whole_batch(tmp_path):
    _, m = tiny_atp(**ATP)
    m.train()
    losses, price, passes = _step(m, _batch())
    assert passes == 2 and losses["marginal"] != 0.0
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = "file://" + os.path.join(tmp_path, "rendezvous")
    mp.start_processes(_worker, args=(2, init, q), nprocs=2, join=True, start_method="spawn")
    got = dict(q.get(timeout=60) for _ in range(2))
    for rank in (0, 1):
        r_losses, r_price, r_passes = got[rank]
        assert r_passes == 2  # rank 1 has one image sample of its own and still runs both passes
        assert r_price == pytest.approx(price, rel=1e-5)  # one price, the whole batch's
    # each rank's L_marginal is its share of the global mean; the gradients are averaged over ranks
    assert (got[0][0]["marginal"] + got[1][0]["marginal"]) / 2 == pytest.approx(losses["marginal"], rel=1e-4)
