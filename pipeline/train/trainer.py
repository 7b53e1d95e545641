"""The trainer: visual instruction tuning with the ATP budget losses under a DeepSpeed engine.
Stages `sft`, `base` and `variants` call `train` (pipeline/stages/).

- Model: `run_dir/projector` loaded by transformers under ZeRO-3 (partitioned at build,
  weights rank 0 -> partitions); vision tower frozen; two param groups, LM + projector at
  `train.lr_lm` and `atp_modules.*` at `train.lr_atp`; DeepSpeed's AdamW and
  a warmup + cosine LambdaLR (pipeline.train.ds.lr_schedule), both per group.
- Loss: the model's own `out.loss` = L_ntp + lambda_ATP L_ATP + lambda_target L_target
  (METHOD sec 7), soft masks in train mode; their temperature annealed per step when
  `train.mask_temperature_end` is set (`mask_temperature_at`, METHOD sec 19).
- Data position: the checkpoint records (epoch, global samples consumed in it: steps x
  global batch). Exact mode (`data.resampled=false`, pipeline.data): one global order per
  epoch, independent of the world size; a resumed run starts the epoch's loader at that
  position, on any world size, and no sample of the epoch repeats (the others' bytes are
  read, nothing is decoded). Resampled mode: a stream fixed by (data.seed, epoch, rank,
  worker), drawn with replacement; a resumed run replays position / (world x batch)
  batches of each rank's stream (exact on the same world size; on another one it continues
  the new ranks' streams at the same sample count). The checkpoint's record holds the data
  seed and shard list; a resume with others is refused (pipeline.train.ckpt_record).
- Another world size (ZeRO-3): the checkpoint is converted to DeepSpeed's universal
  checkpoint and loaded from it (pipeline.train.checkpoint: `resume_plan`, `to_universal`), the
  fp32 weights checked bit-identical against the saved digest; the global batch must stay
  the same (`train.allow_batch_change=true` to change it).
- Checkpoints every `train.checkpoint_every` steps and at the end (pipeline.train.checkpoint:
  a completion marker per tag; a resume starts from the newest complete one), with step,
  data position, skip counts, non-finite step counts and RNG states in each rank's client state.
- SIGTERM / SIGUSR1 (pipeline.core.distributed.StopSignal): all ranks agree after a step,
  save, and the stage returns incomplete (exit 0); USR1 before the end also leaves
  `run_dir/.preempted` for the requeue logic. A single process also stops while it waits
  for a step's first batch (nothing of the step done yet); several ranks stop after the
  step, their wait bounded by `data.max_consecutive_bad`.
- Non-finite loss or gradients (any rank): the update is skipped, the LR schedule still
  advances (it follows the step count), the step is counted (`train/nonfinite_steps`,
  `train/step_skipped`), and `train.max_nonfinite_steps` in a row stop the run
  (NonFiniteTraining).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from model import AtpLlavaConfig, AtpLlavaForConditionalGeneration
from pipeline.core.config import RunConfig
from pipeline.core.distributed import StopRequested, mark_preempted, use_cuda
from pipeline.data.loader import build_loader, list_shards
from pipeline.train import checkpoint, ckpt_record
from pipeline.train.build import apply_atp_fields
from pipeline.train.ds import build_ds_config, lr_schedule, use_autocast, use_bf16, zero3_enabled
from pipeline.train.monitor import Monitor

log = logging.getLogger(__name__)
LOSS_TERMS = ("total", "ntp", "atp", "target", "marginal")
REPAIRED = ("truncated", "converted_image")  # counted by the loader, but kept, not skipped


class NonFiniteTraining(RuntimeError):
    """`train.max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradients."""


def train(run: RunConfig, ctx, out: Path, start: Path, tb_dir: Path | None = None) -> bool:
    """The training loop: from the HF dir `start` into `out`, TensorBoard scalars into `tb_dir`
    (default run_dir/tb). ctx: a stage's Context (dist, stop). False: stopped on a signal."""
    return SftRecipe(run, ctx, out, start, tb_dir).run()


class SftRecipe:
    """One sft run, in the order it happens: `setup` (model, data, DeepSpeed engine; False when
    a signal came while waiting for the calibration batch), `resume` (the newest complete
    checkpoint, if any), `step` (one optimizer step, with its logging, checks and saves),
    `save`, `halt` (save and stop on a signal) and `close`. `run` strings them together."""

    def __init__(self, run: RunConfig, ctx, out: Path, start: Path, tb_dir: Path | None = None):
        self.cfg, self.dist, self.stop = run, ctx.dist, ctx.stop
        self.out, self.start, self.run_dir = out, start, Path(run.run_dir)
        self.tb_dir = tb_dir or self.run_dir / "tb"
        self.ckpt_dir = out / checkpoint.DIRNAME
        self.step_no, self.saved_at = 0, 0
        self.nonfinite = {"total": 0, "in_row": 0}
        self.monitor: Monitor | None = None
        # One process can stop cleanly while it waits for data (nothing of a step done yet);
        # ranks stop together after a step, their wait bounded by data.max_consecutive_bad.
        self.wait = self.stop.interruptible if self.dist.world_size == 1 else contextlib.nullcontext

    def run(self) -> bool:
        if not self.setup():
            return False
        self.resume()
        while self.step_no < self.total_steps:
            try:
                self.step()
            except StopRequested as e:
                log.warning("%s while waiting for the data of step %d", e, self.step_no + 1)
                self.stop.should_stop()
                return self.halt()
            if self.step_no < self.total_steps and self.stop.should_stop():
                return self.halt()
        self.close()
        return True

    # -------------------------------------------------------------- setup and resume

    def setup(self) -> bool:
        import deepspeed
        from transformers import AutoImageProcessor, AutoTokenizer

        run, dist, start = self.cfg, self.dist, self.start
        if run.train.max_nonfinite_steps < 1:
            raise ValueError(
                f"config error at 'train.max_nonfinite_steps': must be >= 1, got {run.train.max_nonfinite_steps}"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        _seed_everything(run.seed)

        tokenizer = AutoTokenizer.from_pretrained(start)
        self.image_processor = AutoImageProcessor.from_pretrained(start)
        self.config = config = apply_atp_fields(AtpLlavaConfig.from_pretrained(start), run)
        self.data = DataStream(run, tokenizer, self.image_processor, config, dist)
        steps_per_epoch = self.data.batches_per_epoch // run.train.grad_accum
        if steps_per_epoch < 1:
            raise ValueError(
                f"an epoch has {self.data.batches_per_epoch} batches per rank, fewer than train.grad_accum"
            )
        self.total_steps = steps_per_epoch * run.train.epochs
        if run.train.max_steps:
            self.total_steps = min(self.total_steps, run.train.max_steps)

        cuda = use_cuda()
        self.peak = PeakMemory()  # the baseline: before the model is built
        ds = build_ds_config(
            run,
            world_size=dist.world_size,
            total_steps=self.total_steps,
            hidden_size=config.text_config.hidden_size,
            cuda=cuda,
        )
        self.dtype = torch.bfloat16 if use_bf16(run, cuda) else torch.float32
        self.autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=use_autocast(run, cuda))
        with zero3_enabled(ds):
            model = AtpLlavaForConditionalGeneration.from_pretrained(start, config=config, dtype=self.dtype)
        model.config.use_cache = False
        if run.train.calibrate_thresholds and config.pruning == "atp" and checkpoint.resume_tag(self.ckpt_dir) is None:
            try:
                with self.wait():
                    first = next(iter(self.data.make(0)))
            except StopRequested as e:
                log.warning("%s while waiting for the first batch: stopping before training", e)
                self.stop.should_stop()
                if self.stop.preempted:
                    mark_preempted(self.run_dir)
                return False
            _calibrate(model, first, ds, self.autocast, self.dtype)
        groups = _param_groups(model, run)
        # What a checkpoint must have been saved with to load here; a mismatch stops the run
        # before the engine is built, and nothing is renamed (it is not a broken checkpoint).
        self.zero_stage = ds["zero_optimization"]["stage"]  # train.zero_stage, filled by build_ds_config
        self.record = ckpt_record.record(
            model, dist.world_size, self.zero_stage, global_batch=ds["train_batch_size"], data=self.data.identity()
        )
        plan = checkpoint.resume_plan(self.ckpt_dir, self.record, allow_batch_change=run.train.allow_batch_change)
        self.universal = None  # the tag loaded through DeepSpeed's universal checkpoint, if any
        if plan is not None and plan.reshaped:
            log.warning(
                "checkpoint %s/%s was saved on world size %s, this run has %d: resuming through DeepSpeed's "
                "universal checkpoint (the original is kept)",
                self.ckpt_dir,
                plan.tag,
                plan.saved_with["world_size"],
                dist.world_size,
            )
            checkpoint.to_universal(self.ckpt_dir, plan.tag)
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
            self.universal = plan.tag
        if run.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds, lr_scheduler=lr_schedule(run, self.total_steps)
        )
        self.group_names = [g["name"] for g in groups]
        return True

    def resume(self) -> None:
        """The newest complete checkpoint's weights, optimizer, step, data position, RNG and
        non-finite counts (none: step 0); then the monitor, which drops what a crashed run
        logged after that step."""
        loaded = checkpoint.load(
            self.engine,
            self.ckpt_dir,
            world_size=self.dist.world_size,
            record=self.record,
            universal=self.universal,
            allow_batch_change=self.cfg.train.allow_batch_change,
        )
        if loaded is not None:
            tag, client = loaded
            self.step_no = client["step"]
            self.data.restore(client["data"], reshaped=self.universal is not None)
            _set_rng(client["rng"])
            self.nonfinite.update(client.get("nonfinite", {}))
            log.info("resumed from %s/%s at step %d, data %s", self.ckpt_dir, tag, self.step_no, self.data.position())
        self.monitor = Monitor(
            active=self.dist.rank == 0,
            tb_dir=self.tb_dir,
            metrics_path=self.out / "metrics.jsonl",
            start_step=self.step_no,
            total_steps=self.total_steps,
        )
        _report_memory(self.engine, self.out, self.dist, self.monitor)
        self.engine.train()
        self.saved_at = self.step_no

    # -------------------------------------------------------------- one optimizer step

    def step(self) -> None:
        """One optimizer step over `train.grad_accum` micro-batches, then its scalars, the
        non-finite check, the kept-token image, the checkpoint and the fault injection.
        StopRequested: a signal while waiting for the step's first batch (nothing done)."""
        run, engine = self.cfg, self.engine
        t0 = time.perf_counter()
        lrs = engine.get_lr()  # what this step uses
        accum = run.train.grad_accum
        stats, image_sample, data_s, finite = StepStats(self.config, accum), None, 0.0, True
        if run.train.mask_temperature_end is not None:  # on the model's config: from_pretrained copied ours
            self.engine.module.config.mask_temperature = mask_temperature_at(run, self.step_no, self.total_steps)
        for i in range(accum):
            td = time.perf_counter()
            batch = self.data.next(self.wait if i == 0 else contextlib.nullcontext)
            data_s += time.perf_counter() - td
            stats.seq_len = max(stats.seq_len, batch["input_ids"].shape[1])
            with self.autocast:
                outputs = engine(**_model_inputs(batch, engine.device, self.dtype))
            engine.backward(outputs.loss)
            finite = finite and bool(torch.isfinite(outputs.loss.detach()).all())
            if i < accum - 1:
                engine.step()  # accumulates; the update is at the boundary
            else:
                bad_step = _boundary_step(engine, finite)
            stats.add(outputs, batch)
            image_sample = image_sample or _first_image(batch, outputs)
        self.step_no += 1
        step = self.step_no
        step_s = time.perf_counter() - t0
        self._count_nonfinite(bad_step)
        if step % run.train.log_every == 0 or step == self.total_steps or bad_step:  # bad_step: agreed by all ranks
            self._log(stats, lrs, step_s, data_s, bad_step)
        if self.nonfinite["in_row"] >= run.train.max_nonfinite_steps:
            self.close()
            raise NonFiniteTraining(
                f"{self.nonfinite['in_row']} optimizer steps in a row (to step {step}) had a non-finite loss or "
                f"gradients, {self.nonfinite['total']} in all: stopping (train.max_nonfinite_steps="
                f"{run.train.max_nonfinite_steps}). The weights are those of step {step - self.nonfinite['in_row']} "
                "(the last checkpoint before it is the resume point): check the data for NaN/inf, lower the lr."
            )
        if image_sample is not None and step % run.train.image_every == 0:
            pixels, keep = _denormalise(image_sample, self.image_processor)
            self.monitor.kept_tokens_image(step, pixels, keep, self.config.grid_size)
        if step % run.train.checkpoint_every == 0 or step == self.total_steps:
            self.save()
        if run.train.crash_at_step == step and self.dist.rank == run.train.crash_rank:
            log.warning("train.crash_at_step=%d: rank %d kills itself (fault-injection test)", step, self.dist.rank)
            os.kill(os.getpid(), signal.SIGKILL)

    def _count_nonfinite(self, bad_step: bool) -> None:
        self.nonfinite["total"] += bad_step
        self.nonfinite["in_row"] = self.nonfinite["in_row"] + 1 if bad_step else 0
        if bad_step:
            log.warning(
                "step %d: non-finite loss or gradients, update skipped (%d in a row, %d in all)",
                self.step_no,
                self.nonfinite["in_row"],
                self.nonfinite["total"],
            )

    def _log(self, stats: StepStats, lrs, step_s: float, data_s: float, bad_step: bool) -> None:
        scalars = stats.reduce(self.dist.world_size)
        scalars.update({f"lr/{n}": lr for n, lr in zip(self.group_names, lrs)})
        scalars["perf/samples_per_s"] = scalars.pop("samples") / step_s
        if self.cfg.train.mask_temperature_end is not None:
            scalars["atp/mask_temperature"] = self.engine.module.config.mask_temperature
        scalars["perf/step_s"] = step_s
        scalars["perf/data_s"] = data_s
        skipped = self.data.skipped_all_ranks()
        scalars["data/skipped/total"] = sum(n for k, n in skipped.items() if k not in REPAIRED)
        scalars.update({f"data/skipped/{kind}": n for kind, n in skipped.items()})
        scalars["train/nonfinite_steps"] = self.nonfinite["total"]
        scalars["train/step_skipped"] = float(bad_step)
        scalars.update(self.peak.scalars(self.engine.device, stats.seq_len))
        self.monitor.step(self.step_no, scalars, record=scalars)

    # -------------------------------------------------------------- save, stop, close

    def save(self) -> None:
        """Collective: a checkpoint of this step (weights, optimizer, client state)."""
        client = {
            "step": self.step_no,
            # with every rank's skip counts: a resume on another world size restores rank 0's
            "data": self.data.position() | {"skipped_all_ranks": self.data.skipped_all_ranks()},
            "rng": _get_rng(),
            "nonfinite": dict(self.nonfinite),
        }
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            self.step_no,
            keep=self.cfg.train.keep_checkpoints,
            record=self.record,
            digest=self.zero_stage == 3,
            client_state=client,
        )
        self.saved_at = self.step_no

    def halt(self) -> bool:
        """A stop signal: save (unless this step is saved), mark a preemption, stop (False)."""
        log.warning("%s: saving at step %d and stopping", self.stop.signal_name, self.step_no)
        if self.saved_at != self.step_no:
            self.save()
        if self.stop.preempted:
            mark_preempted(self.run_dir)
        self.close()
        return False

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def mask_temperature_at(run: RunConfig, step: int, total: int) -> float:
    """The soft masks' temperature for the step after `step` completed ones (0-based index):
    atp.mask_temperature at the first, train.mask_temperature_end at the last, geometric in
    between (METHOD sec 19), so a resumed run continues the same schedule."""
    start, end = run.atp.mask_temperature, run.train.mask_temperature_end
    if end is None or total < 2:
        return float(start)
    return float(start * (end / start) ** (min(step, total - 1) / (total - 1)))


def _boundary_step(engine, loss_finite: bool) -> bool:
    """engine.step() at the accumulation boundary, the update skipped if a loss or gradient
    is not finite on any rank; True when so.

    DeepSpeed's ZeRO 1-3 and bf16 optimizers find non-finite gradients themselves and skip the
    update (`was_step_applied()` False), leaving the LR schedule where it was: it is advanced
    here. The plain torch optimizer of ZeRO-0 (fp32 weights) has no such check: its gradients
    are checked here, and on a bad step the weights and the optimizer's state are put back
    after DeepSpeed's step (which keeps its own bookkeeping: counters, LR schedule, zeroed
    gradients). Either way the LR schedule stays a function of the step count."""
    opt = engine.optimizer
    own = not hasattr(opt, "overflow")  # DeepSpeed checks nothing for this optimizer
    bad = not loss_finite
    if own and not bad:
        bad = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in engine.module.parameters())
    bad = _any_rank(bad)
    if not (bad and own):
        engine.step()
        if not engine.was_step_applied():
            engine.lr_scheduler.step()
            bad = True
        return bad
    params = [p for p in engine.module.parameters() if p.grad is not None]
    weights = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    for p in params:
        p.grad.zero_()
    engine.step()
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    opt.state.clear()
    opt.state.update(state)
    return True


def _any_rank(flag: bool) -> bool:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        t = torch.tensor([int(flag)], device="cuda" if tdist.get_backend() == "nccl" else "cpu")
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())
    return flag


# ------------------------------------------------------------------ data with a position


class DataStream:
    """Batches across epochs for this rank, with a position the checkpoint can hold: the
    epoch and the global samples consumed in it (`sample`), the same on every rank."""

    def __init__(self, run: RunConfig, tokenizer, image_processor, config, dist):
        self.exact = not run.data.resampled
        self.make = lambda epoch, start=0: build_loader(
            run.data,
            tokenizer,
            image_processor,
            image_token_id=config.image_token_id,
            num_image_tokens=config.num_visual_tokens,
            rank=dist.rank,
            world_size=dist.world_size,
            epoch=epoch,
            drop_last=True,
            **({"start": start} if self.exact else {}),
        )
        self.rank, self.per_batch = dist.rank, dist.world_size * run.data.batch_size  # samples per batch round
        self._identity = {"seed": run.data.seed, "shards": [str(s) for s in list_shards(run.data.shards)]}
        self.batches_per_epoch = self.make(0).num_batches
        self.epoch, self.start, self.batch = 0, 0, 0  # exact: the loader opens at `start`; batches taken since
        self.skipped = Counter()  # skips of finished epochs (and of the run before a resume)
        self._loader = self._it = None

    def identity(self) -> dict:
        """What fixes the order the position is a place in: data seed and shard list (kept in
        the checkpoint's record; ckpt_record refuses a resume where they differ)."""
        return dict(self._identity)

    def position(self) -> dict:
        sample = self.start + self.batch * self.per_batch
        return {"epoch": self.epoch, "sample": sample, "skipped": dict(self._skips())}

    def restore(self, pos: dict, reshaped: bool = False) -> None:
        """`reshaped`: saved on another world size, `pos` is rank 0's: the skip counts of
        all ranks go to rank 0, none to the others."""
        sample = pos["sample"] if "sample" in pos else pos["batch"] * self.per_batch  # older checkpoints
        self.epoch = pos["epoch"]
        self.start, self.batch = (sample, 0) if self.exact else (0, sample // self.per_batch)
        skipped = pos.get("skipped_all_ranks", pos["skipped"]) if reshaped else pos["skipped"]
        self.skipped = Counter(skipped if (self.rank == 0 or not reshaped) else {})
        self._loader = self._it = None

    def next(self, wait=contextlib.nullcontext) -> dict:
        """The next batch. `wait`: the context of the wait (StopSignal.interruptible: a stop
        signal ends it with StopRequested, the position still that of the last batch taken)."""
        with wait():
            while True:
                if self._it is None:
                    self._open()
                try:
                    batch = next(self._it)
                    break
                except StopIteration:
                    self.skipped = self._skips()
                    self.epoch, self.start, self.batch = self.epoch + 1, 0, 0
                    self._loader = self._it = None
        self.batch += 1
        return batch

    def _open(self) -> None:
        loader = self.make(self.epoch, self.start)
        it = iter(loader)
        for _ in range(self.batch):  # resampled: replay to the recorded position
            next(it)
        loader.stats.clear()  # the replayed skips are already in self.skipped
        self._loader, self._it = loader, it  # only now: an interrupted replay leaves nothing half-open

    def _skips(self) -> Counter:
        return self.skipped + (self._loader.stats if self._loader is not None else Counter())

    def skipped_all_ranks(self) -> dict:
        counts = dict(self._skips())
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            gathered = [None] * tdist.get_world_size()
            tdist.all_gather_object(gathered, counts)
            counts = sum((Counter(c) for c in gathered), Counter())
        return dict(counts)


def _model_inputs(batch: dict, device, dtype) -> dict:
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels", "query_mask")}
    if batch["pixel_values"] is not None:
        inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
    return inputs


# ------------------------------------------------------------------ metrics of one step


class StepStats:
    """Per-step averages over micro-batches and ranks: every loss term, N_bar, tokens kept
    after each ATP module (soft: sum of C_k; hard: C_k >= 0.5, what inference would keep
    given these masks), the thresholds' mean/min/max per module. Each statistic is a named
    float64 tensor; `reduce` sends the sums in one all_reduce and the extremes in two."""

    SUMS = ("loss", "n_bar", "samples", "kept", "theta_mean", "kept_hard")  # summed, in this order

    def __init__(self, config, accum: int):
        self.k = k = len(config.atp_layers) if config.pruning != "none" else 0
        self.accum = accum

        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.float64)

        self.loss = zeros(len(LOSS_TERMS))  # LOSS_TERMS
        self.n_bar, self.samples = zeros(1), zeros(1)
        self.kept, self.kept_hard = zeros(k), zeros(k)  # per module: soft sum of C_k, count of C_k >= 0.5
        self.theta_mean = zeros(2, k)  # [theta_r, theta_s] x module, per-step mean over images
        self.theta_min = torch.full((2, k), float("inf"), dtype=torch.float64)
        self.theta_max = torch.full((2, k), float("-inf"), dtype=torch.float64)
        self.seq_len = 0  # the longest padded micro-batch (data/max_seq_len, the memory plan's L)

    def add(self, outputs, batch) -> None:
        losses = outputs.atp_losses or {}
        self.loss += torch.tensor([float(losses.get(t, 0.0)) for t in LOSS_TERMS], dtype=torch.float64)
        self.n_bar += float(losses.get("n_bar", 0.0))
        self.samples += float(len(batch["keys"]))
        info, has_img = outputs.atp_info, batch["has_image"]
        if self.k and info is not None and has_img.any():
            keep = info["keep"].float()[has_img.to(info["keep"].device)]  # [n_img, K, Lv]
            theta = info["thresholds"].float()[has_img.to(info["thresholds"].device)]  # [n_img, K, 2]
            self.kept += torch.tensor(keep.sum(-1).mean(0).tolist(), dtype=torch.float64)
            means = [theta[..., 0].mean(0).tolist(), theta[..., 1].mean(0).tolist()]  # theta_r, theta_s
            self.theta_mean += torch.tensor(means, dtype=torch.float64)
            self.kept_hard += torch.tensor((keep >= 0.5).float().sum(-1).mean(0).tolist(), dtype=torch.float64)
            per_module = theta.permute(2, 1, 0).double().cpu()  # [2, K, n_img]
            self.theta_min = torch.minimum(self.theta_min, per_module.min(-1).values)
            self.theta_max = torch.maximum(self.theta_max, per_module.max(-1).values)

    def reduce(self, world: int) -> dict:
        sums = torch.cat([getattr(self, f).reshape(-1) for f in self.SUMS])
        mins, maxs = self.theta_min.clone(), self.theta_max.clone()
        if tdist.is_initialized() and world > 1:
            tdist.all_reduce(sums)
            tdist.all_reduce(mins, op=tdist.ReduceOp.MIN)
            tdist.all_reduce(maxs, op=tdist.ReduceOp.MAX)
        parts = dict(zip(self.SUMS, sums.split([getattr(self, f).numel() for f in self.SUMS])))
        n = self.accum * world
        out = {f"loss/{t}": parts["loss"][i].item() / n for i, t in enumerate(LOSS_TERMS)}
        out["atp/n_bar"] = parts["n_bar"].item() / n
        out["samples"] = parts["samples"].item()
        theta_mean = parts["theta_mean"].reshape(2, self.k)
        for j in range(self.k):
            out[f"atp/kept/module{j}"] = parts["kept"][j].item() / n
            out[f"atp/kept_hard/module{j}"] = parts["kept_hard"][j].item() / n
            for row, which in enumerate(("theta_r", "theta_s")):
                out[f"atp/{which}/module{j}/mean"] = theta_mean[row, j].item() / n
                out[f"atp/{which}/module{j}/min"] = mins[row, j].item()
                out[f"atp/{which}/module{j}/max"] = maxs[row, j].item()
        return out


def _first_image(batch, outputs):
    """(pixel_values [3, H, W], keep [K, Lv]) of the batch's first image sample."""
    info = outputs.atp_info
    if info is None or batch["pixel_values"] is None:
        return None
    b = int(torch.nonzero(batch["has_image"])[0])
    return batch["pixel_values"][0].float().cpu(), info["keep"][b].float().cpu()


def _denormalise(sample, image_processor):
    pixels, keep = sample
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    return pixels * std + mean, keep


# ------------------------------------------------------------------ model set-up


def _calibrate(model, batch, ds: dict, autocast, dtype) -> None:
    """Start the thresholds at this run's target share, measured on the first batch
    (model/calibration.py); rank 0's values win. Under ZeRO-3 the parameters are gathered
    for that one forward (all ranks take part)."""
    import deepspeed

    from model.calibration import calibrate_thresholds

    zero3 = ds.get("zero_optimization", {}).get("stage") == 3
    gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=zero3)
    device = next(model.parameters()).device
    with gather, autocast:
        inputs = _model_inputs(batch, device, dtype)
        inputs.pop("labels")
        thetas = calibrate_thresholds(model, **inputs)
    log.info("thresholds calibrated on %d samples: theta_r %s", len(batch["keys"]), [round(t, 4) for t in thetas])


def _param_groups(model, run: RunConfig) -> list[dict]:
    """Vision tower frozen; LM + projector at lr_lm (unless frozen); ATP at lr_atp."""
    if run.model.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    if run.model.freeze_lm:
        model.model.language_model.requires_grad_(False)
        model.lm_head.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(False)
    lm, atp = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (atp if name.startswith("atp_modules.") else lm).append(p)
    groups = [
        {"name": "lm", "params": lm, "lr": run.train.lr_lm},
        {"name": "atp", "params": atp, "lr": run.train.lr_atp},
    ]
    return [g for g in groups if g["params"]]


class PeakMemory:
    """Peak memory of this process for the metrics (`mem/*`, the largest over the ranks):
    on CUDA torch's max_memory_allocated; always the peak RSS (VmHWM) and the peak above the
    RSS measured when this object was made (before the model is built), what
    `python -m pipeline plan` estimates on a CPU."""

    def __init__(self):
        self.baseline = _status_kib("VmRSS")

    def scalars(self, device, seq_len: int) -> dict:
        """Also `data/max_seq_len`: the longest padded micro-batch this step (the plan's L)."""
        hwm = _status_kib("VmHWM")
        vec = [seq_len, hwm / 1024, (hwm - self.baseline) / 1024]
        if device.type == "cuda":
            vec.append(torch.cuda.max_memory_allocated(device) / 2**20)
        t = torch.tensor(vec, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        names = ("data/max_seq_len", "mem/peak_rss_mb", "mem/peak_rss_above_baseline_mb", "mem/cuda_max_allocated_mb")
        return dict(zip(names, t.tolist()))


def _status_kib(field: str) -> float:
    """A /proc/self/status memory field in KiB (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def _report_memory(engine, out: Path, dist, monitor: Monitor) -> None:
    """Bytes of parameters (this rank's ZeRO-3 partitions, else whole tensors) and of the
    optimizer's state on this rank; written per rank for the note's measurement."""
    import json

    param_bytes = 0
    full_bytes = 0
    for p in engine.module.parameters():
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        held = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        param_bytes += held * p.element_size()
        full_bytes += full * p.element_size()
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        opt_bytes += flat.numel() * flat.element_size()  # ZeRO-3's fp32 master partitions
    rec = {
        "rank": dist.rank,
        "world_size": dist.world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "param_bytes_this_rank": param_bytes,
        "param_bytes_full_model": full_bytes,
        "optimizer_bytes_this_rank_before_first_step": opt_bytes,
    }
    (out / f"memory_rank{dist.rank}.json").write_text(json.dumps(rec) + "\n")
    log.info(
        "parameter memory: %.2f MB on this rank of %.2f MB (world %d, ZeRO %d)",
        param_bytes / 2**20,
        full_bytes / 2**20,
        dist.world_size,
        rec["zero_stage"],
    )
    monitor.text("memory/rank0", json.dumps(rec))


# ------------------------------------------------------------------ seeds and RNG state


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _get_rng() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
