"""Stand-in for `python -m pipeline stage sft CONFIG key=value...` until the pipeline
exists: same argv, same stop/preemption contract (pipeline/distributed.py docstring), same
artefacts the SLURM tests read: a DeepSpeed ZeRO-3 checkpoint dir `run_dir/checkpoints`
with `latest`, and TensorBoard scalars `train/loss` per step in `run_dir/tb`.
A tiny MLP on synthetic data; every step's batch depends only on (seed, step, rank), so a
resumed run is bit-identical to an uninterrupted one."""
import sys

from pipeline import distributed as dist

stop = dist.StopSignal()  # first: Python's default action for SIGUSR1 is to die

import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def main(argv):
    if argv[:1] == ["stage"]:
        argv = argv[2:]  # "stage sft": accepted like the pipeline's CLI
    cfg = OmegaConf.merge(OmegaConf.load(argv[0]), OmegaConf.from_dotlist(argv[1:]))
    info = dist.init_distributed()
    import deepspeed
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(cfg.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ds_config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True,
                 "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    run_dir = Path(cfg.run_dir)
    ckpt = run_dir / "checkpoints"
    step = 0
    if (ckpt / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt))
        step = client["step"]
    log(info, f"start at step {step} restart={os.environ.get('SLURM_RESTART_COUNT', 0)}")
    tb = SummaryWriter(str(run_dir / "tb")) if info.is_main else None

    def save():
        t = time.time()
        # save_latest=False: DeepSpeed writes `latest` on rank 0 before its final barrier,
        # i.e. possibly before other ranks' shards are on disk. Point `latest` at the tag
        # only after save_checkpoint's barrier, atomically.
        engine.save_checkpoint(str(ckpt), tag=f"step{step}", client_state={"step": step},
                               save_latest=False)
        if info.is_main:
            (ckpt / "latest.tmp").write_text(f"step{step}")
            os.replace(ckpt / "latest.tmp", ckpt / "latest")
        log(info, f"saved step{step} in {time.time() - t:.2f}s")

    while step < cfg.steps:
        step += 1
        g = torch.Generator().manual_seed(cfg.seed * 100003 + step * 101 + info.rank)
        x = torch.randn(8, 16, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        if tb:
            tb.add_scalar("train/loss", loss.item(), step)
            tb.flush()
        time.sleep(cfg.step_sleep)
        finished = step == cfg.steps
        stopping = stop.should_stop()  # collective: every rank stops after the same step
        if finished or stopping or step % cfg.save_every == 0:
            save()
        if stopping and not finished:
            log(info, f"{stop.signal_name}: stopped after step {step}")
            if stop.preempted:
                dist.mark_preempted(run_dir)
            break
    if tb:
        tb.close()
    dist.shutdown()


def log(info, msg):
    print(f"[{time.time():.3f} rank{info.rank}] {msg}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
