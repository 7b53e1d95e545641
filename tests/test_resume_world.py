"""Resuming on another world size (issue 22 part 2), on real runs of the tiny pipeline
(tests/tiny_pipeline.py) with the data in exact mode (`data.resampled=false`: one global order
per epoch).

A 2-rank ZeRO-3 run (global batch 8 = 4 per rank) dies after its step-4 checkpoint; it resumes
on 1 process (grad_accum 2) and on 4 ranks (2 per rank) through DeepSpeed's universal
checkpoint: the fp32 weights at the resume point are bit-identical to the saved ones (a
partition-independent digest, checked here against DeepSpeed's own zero_to_fp32 of the
original tag), the LR schedule continues, the original tag is kept. The data stream is
counted on the trainer's own DataStream: across the world-size change no sample of the
epoch repeats and none is missed. A changed global batch or architecture is refused (exit 2),
nothing renamed.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_pipeline import BATCH, SAMPLES, build, launch

CKPT = Path("sft") / "checkpoints"
EXACT = ["data.resampled=false", "train.max_steps=8"]  # 8 steps = one epoch at global batch 8
RESUME = "step00000004"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    t = build(tmp_path_factory.mktemp("world"))
    launch(["run", t["config"], "stages=[projector]"], nproc=1)
    return t


@pytest.fixture(scope="module")
def two_ranks(tiny, tmp_path_factory):
    """2 ranks, checkpoints at 2 and 4, rank 1 killed after step 4."""
    run = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(tiny["root"] / "run" / "projector", run / "projector")
    p = launch(sft_args(tiny, run, "train.crash_at_step=4"), nproc=2, check=False)
    assert p.returncode != 0 and (run / CKPT / RESUME / "COMPLETE").is_file(), p.stderr[-3000:]
    return run


def sft_args(tiny, run: Path, *overrides) -> list:
    return ["run", tiny["config"], f"run_dir={run}", "stages=[sft]", *EXACT, *overrides]


def tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / CKPT).iterdir() if p.is_dir())


def full_digest(state: dict) -> str:
    """pipeline.train.checkpoint.fp32_digest's formula on whole tensors (no partitions)."""
    total = 0
    for name, t in state.items():
        bits = t.detach().float().reshape(-1).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        index = torch.arange(bits.numel(), dtype=torch.int64)
        weight = (index * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**31 - 1) + 1
        total += int((bits * weight).sum())
    return f"{total % 2**64:016x}"


def expected_lrs(config: Path, total: int) -> list[float]:
    """The LM group's lr at steps 1..total from the trainer's own schedule."""
    from pipeline.core.config import load_config
    from pipeline.train.ds import lr_schedule

    run = load_config(config)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=run.train.lr_lm)
    sched = lr_schedule(run, total)(opt)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("nproc,overrides", [(1, ["train.grad_accum=2"]), (4, ["data.batch_size=2"])])
def test_a_two_rank_checkpoint_resumes_on_another_world_size(tiny, two_ranks, tmp_path, nproc, overrides):
    from pipeline.train.checkpoint import consolidated_state_dict
    from pipeline.train.monitor import read_metrics

    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    saved = json.loads((run / CKPT / RESUME / "COMPLETE").read_text())
    assert saved["saved_with"]["world_size"] == 2 and saved["saved_with"]["global_batch"] == 8
    # the marker's digest is that of DeepSpeed's own consolidation of the 2-rank tag
    original = tmp_path / "original"
    (original).mkdir()
    shutil.copytree(run / CKPT / RESUME, original / RESUME)
    (original / "FORMAT").write_text("")
    assert full_digest(consolidated_state_dict(original)) == saved["fp32_digest"]

    p = launch(sft_args(tiny, run, *overrides), nproc=nproc)
    assert f"was saved on world size 2, this run has {nproc}: resuming through DeepSpeed's universal" in p.stderr
    assert f"fp32 weights identical to the saved ones (digest {saved['fp32_digest']})" in p.stderr
    assert f"resumed from {run / CKPT}/{RESUME} at step 4, data {{'epoch': 0, 'sample': 32" in p.stderr
    metrics = read_metrics(run / "sft" / "metrics.jsonl")
    assert sorted(metrics) == list(range(1, 9))
    lrs = expected_lrs(tiny["config"], 8)
    assert [metrics[s]["lr/lm"] for s in range(1, 9)] == pytest.approx(lrs, rel=1e-12)
    # the original is kept; the new world size saved natively and the conversion is gone
    assert tags(run) == ["step00000006", "step00000008"]
    assert (two_ranks / CKPT / RESUME / "COMPLETE").is_file()
    marker = json.loads((run / CKPT / "step00000008" / "COMPLETE").read_text())
    assert marker["saved_with"]["world_size"] == nproc and marker["saved_with"]["global_batch"] == 8


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["train.grad_accum=1"], "global batch 8 when saved, 4 now"),
        (
            ["train.grad_accum=2", "atp.spatial_strides=[2]"],
            "model architecture differs (saved -> now): spatial_strides",
        ),
    ],
)
def test_a_changed_global_batch_or_architecture_is_refused_and_kept(tiny, two_ranks, tmp_path, overrides, named):
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    before = tags(run)
    p = launch(sft_args(tiny, run, *overrides), nproc=1, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"CheckpointMismatch: checkpoint {run / CKPT}/{RESUME} was saved with another" in p.stderr
    assert named in p.stderr and "nothing was renamed" in p.stderr
    assert tags(run) == before and not (run / CKPT / "universal").exists()


# ------------------------------------------------------------------ the data stream, counted


def stream(tiny, rank: int, world: int, batch: int, workers: int = 0):
    from transformers import AutoImageProcessor, AutoTokenizer

    from pipeline.core.config import load_config
    from pipeline.train.trainer import DataStream

    run = load_config(
        tiny["config"], ["data.resampled=false", f"data.batch_size={batch}", f"data.num_workers={workers}"]
    )
    start = tiny["root"] / "run" / "projector"
    tok = AutoTokenizer.from_pretrained(start)
    proc = AutoImageProcessor.from_pretrained(start)
    config = SimpleNamespace(image_token_id=tok.convert_tokens_to_ids("<image>"), num_visual_tokens=16)
    return DataStream(run, tok, proc, config, SimpleNamespace(rank=rank, world_size=world))


def take(streams, batches: int) -> list[str]:
    return [k for s in streams for _ in range(batches) for k in s.next()["keys"]]


@pytest.mark.parametrize("world,batch,workers", [(1, 4, 0), (4, 2, 2)])
def test_the_data_stream_continues_from_the_global_position_without_repeats(tiny, world, batch, workers):
    """4 batches on each of 2 ranks (32 samples), then the rest of the epoch on `world` ranks
    from the saved position: every one of the 64 samples exactly once."""
    before = [stream(tiny, r, 2, BATCH) for r in range(2)]
    first = take(before, 4)
    pos = before[0].position()
    assert pos["epoch"] == 0 and pos["sample"] == 32 and before[1].position()["sample"] == 32
    after = [stream(tiny, r, world, batch, workers) for r in range(world)]
    for s in after:
        s.restore(pos, reshaped=True)
    rest = take(after, (SAMPLES - 32) // (world * batch))
    keys = first + rest
    assert len(keys) == SAMPLES and len(set(keys)) == SAMPLES  # none repeated, none missed
    assert {s.position()["sample"] for s in after} == {SAMPLES}
    after[0].next()  # the next batch opens epoch 1
    assert after[0].position()["epoch"] == 1
