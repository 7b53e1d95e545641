"""What rank 0 shows of a training run: a tqdm bar, TensorBoard scalars and images, and
`metrics.jsonl` (one line per optimizer step, the record the resume test compares).

Other ranks get a Monitor that does nothing, so the train loop needs no rank checks.
On resume, TensorBoard's `purge_step` and a truncated metrics.jsonl drop what the
crashed run logged after its last checkpoint: the records read as one uninterrupted run.
metrics.jsonl is appended one whole line per write; a line a crash cut short (or any line
that is not JSON) is dropped with a warning when a run starts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, *, active: bool, tb_dir: Path, metrics_path: Path, start_step: int, total_steps: int):
        self.active = active
        self.metrics_path = metrics_path
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        _truncate_jsonl(metrics_path, start_step)
        # purge_step: events at steps > start_step came from a run that did not save them
        self.writer = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="sft", unit="step", dynamic_ncols=True)

    def step(self, step: int, scalars: dict[str, float], record: dict) -> None:
        if not self.active:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        with open(self.metrics_path, "a") as f:  # one write per line: a crash tears at most the last
            f.write(json.dumps({"step": step, **record}) + "\n")
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{record.get('loss/total', float('nan')):.4f}", n_bar=f"{record.get('atp/n_bar', float('nan')):.1f}"
        )

    def kept_tokens_image(self, step: int, image: torch.Tensor, keep: torch.Tensor, grid: int) -> None:
        """`image` [3, H, W] in [0, 1]; `keep` [K, Lv] cumulative masks C_k. One panel per
        ATP layer: kept patches as they are, pruned ones dimmed to 20%."""
        if not self.active:
            return
        _, H, W = image.shape
        lv = keep.shape[-1]
        keep = keep[:, lv - grid * grid :]  # "full" strategy: drop the CLS column
        masks = keep.float().reshape(-1, 1, grid, grid)
        masks = torch.nn.functional.interpolate(masks, size=(H, W), mode="nearest")
        panels = torch.cat([image[None], image[None] * (0.2 + 0.8 * masks)], 0)
        self.writer.add_images("kept_tokens/input_then_atp_layers", panels.clamp(0, 1), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.active:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.writer.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step; drop unreadable lines (a torn last line)."""
    if not path.exists():
        return
    keep = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line:
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a whole record (a write cut short by a crash?): dropped", path, n)
            continue
        if step <= last_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def read_metrics(path: str | Path) -> dict[int, dict]:
    """step -> record (a later line for the same step wins)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


# the scalars a run's summary shows by default: speed, data wait, loss, budget, memory, skips
SUMMARY_KEYS = (
    "perf/step_s",
    "perf/samples_per_s",
    "perf/data_s",
    "loss/ntp",
    "atp/n_bar",
    "mem/peak_rss_mb",
    "mem/peak_rss_above_baseline_mb",
    "data/max_seq_len",
    "train/step_skipped",
)


def summarise(metrics: dict[int, dict], keys=SUMMARY_KEYS, from_step: int = 1, window: int = 10) -> list[dict]:
    """Per key present: median [min, max] over the steps >= from_step, and the means of the first
    and last `window` of those steps (where a curve started and ended)."""
    import statistics

    steps = [s for s in sorted(metrics) if s >= from_step]
    rows = []
    for key in keys:
        vals = [metrics[s][key] for s in steps if metrics[s].get(key) is not None]
        if not vals:
            continue
        w = min(window, len(vals))
        rows.append(
            {
                "key": key,
                "steps": len(vals),
                "median": statistics.median(vals),
                "min": min(vals),
                "max": max(vals),
                "first": sum(vals[:w]) / w,
                "last": sum(vals[-w:]) / w,
            }
        )
    return rows


def main(argv=None) -> int:
    """python -m pipeline metrics RUN_DIR/sft/metrics.jsonl [--keys K ...] [--from-step N] [--window W]"""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m pipeline metrics", description="a training run's metrics.jsonl, summarised"
    )
    p.add_argument("path", help="metrics.jsonl, or the stage folder holding it")
    p.add_argument("--keys", nargs="+", default=list(SUMMARY_KEYS), help="scalars to show (default: %(default)s)")
    p.add_argument("--from-step", type=int, default=1, help="first step counted (skip warm-up steps)")
    p.add_argument("--window", type=int, default=10, help="steps averaged at the start and the end")
    a = p.parse_args(argv)
    path = Path(a.path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    metrics = read_metrics(path)
    if not metrics:
        print(f"{path}: no steps")
        return 1
    rows = summarise(metrics, a.keys, a.from_step, a.window)
    print(f"{path}: steps {min(metrics)}-{max(metrics)}; from step {a.from_step}")
    print(f"| scalar | steps | median [min, max] | mean of the first -> last {a.window} |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['key']} | {r['steps']} | {r['median']:.4g} [{r['min']:.4g}, {r['max']:.4g}] "
            f"| {r['first']:.4g} -> {r['last']:.4g} |"
        )
    shown = {r["key"] for r in rows}
    missing = [k for k in a.keys if k not in shown]
    if missing:
        print(f"not logged: {', '.join(missing)}")
    return 0
