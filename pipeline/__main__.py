"""The pipeline's command line.

    python -m pipeline run [CONFIG] [key=value ...]          # the config's stages, in order
    python -m pipeline stage NAME [CONFIG] [key=value ...]   # one stage
    python -m pipeline config [CONFIG] [key=value ...]       # print the resolved config
    python -m pipeline eval --checkpoint DIR --shards DIR --out DIR ...   # pipeline/eval/evaluate.py
    python -m pipeline bench [...]                           # pipeline/eval/bench.py: prefill time vs FLOPs
    python -m pipeline headroom --checkpoint FIXED ...       # pipeline/eval/headroom.py: adaptivity oracle
    python -m pipeline plan [CONFIG] --nodes N --gpus-per-node G --gpu-mem GiB   # pipeline/train/plan.py
    python -m pipeline metrics RUN_DIR/sft [--from-step N]    # pipeline/train/monitor.py: a run's scalars summarised

CONFIG defaults to the embedded default (pipeline/configs/default.yaml). Launch the same
command under `torchrun`, `deepspeed --module pipeline ...` or `srun`; pipeline.core.distributed
maps whichever environment it finds. A stage whose `run_dir/NAME/DONE` exists is skipped
(`--force` reruns it); a rerun after a crash resumes sft from its newest complete checkpoint.
One run at a time per run_dir (pipeline/core/lock.py): a second one exits 1 naming the first.
Exit status: 0 done or stopped on SIGTERM/SIGUSR1 after saving, 2 bad config (a checkpoint
saved with another ZeRO stage, model or global batch included; another world size under
ZeRO-3 resumes), 1 failure (another rank lost included: "error: PeerLost: ..." names its
ranks and host).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from pipeline.core.config import ConfigError, load_config, save_config, to_yaml

log = logging.getLogger("pipeline")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    # the deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK says the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("run", "stage", "config"):
        s = sub.add_parser(cmd)
        if cmd == "stage":
            s.add_argument("name")
        s.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
        s.add_argument("--force", action="store_true", help="rerun stages already marked DONE")
    args = p.parse_args(argv)
    # The first argument without "=" is the config file; the rest are overrides.
    args.config = None
    if args.rest and "=" not in args.rest[0]:
        args.config = args.rest.pop(0)
    bad = [a for a in args.rest if "=" not in a]
    if bad:
        p.error(f"expected key=value overrides, got {bad}")
    return args


# commands with their own options
TOOLS = {
    "eval": "pipeline.eval.evaluate",
    "bench": "pipeline.eval.bench",
    "headroom": "pipeline.eval.headroom",
    "plan": "pipeline.train.plan",
    "metrics": "pipeline.train.monitor",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        import importlib

        rc = importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return rc if isinstance(rc, int) else 0
    args = parse(argv)
    try:
        run = load_config(args.config, args.rest)
        if args.cmd == "stage":
            from pipeline.stages import check_names  # the registry is a plain dict; cheap

            check_names([args.name], key="stage")
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.cmd == "config":
        print(to_yaml(run), end="")
        return 0

    # First thing after the config: Python's default action for SIGUSR1 is to die.
    from pipeline.core.distributed import StopSignal, init_distributed, lost_peer, shutdown

    stop = StopSignal()
    dist = init_distributed()
    _setup_logging(dist.rank)
    names = run.stages if args.cmd == "run" else [args.name]
    from pipeline.core.lock import RunDirLocked, run_dir_lock
    from pipeline.train.checkpoint import CheckpointMismatch

    try:
        with run_dir_lock(run.run_dir, dist.world_size, dist.rank):  # before anything is written
            _run_stages(run, names, dist, stop, force=args.force)
    except RunDirLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointMismatch) as e:  # checks that need the built model (pipeline.train.build, sft)
        print(f"error: {type(e).__name__}: {e}" if isinstance(e, CheckpointMismatch) else e, file=sys.stderr)
        return 2
    except RuntimeError as e:  # a collective that lost another rank: name it, not a gloo traceback
        if (lost := lost_peer(e)) is None:
            raise
        print(f"error: PeerLost: {lost}", file=sys.stderr)
        return 1
    shutdown()  # only on success: after a failure the other ranks may never reach a barrier
    return 0


def _run_stages(run, names, dist, stop, force: bool) -> None:
    import torch.distributed as tdist

    from pipeline import stages

    run_dir = Path(run.run_dir)
    if dist.rank == 0:
        save_config(run, run_dir / "config.yaml")
    for name in names:
        out = run_dir / name
        done = out / stages.DONE
        if stages.is_done(out) and not force:
            log.info("stage %s: complete (%s), skipped", name, done)
            continue
        if dist.rank == 0:
            done.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
        tdist.barrier()
        where = f": {dist.placement()}" if dist.hosts else ""
        log.info("stage %s: start (world size %d%s)", name, dist.world_size, where)
        t0 = time.time()
        complete = stages.load(name)(run, stages.Context(dist=dist, stop=stop), out)
        tdist.barrier()
        if not complete:
            log.info("stage %s: stopped on %s; rerun to resume", name, stop.signal_name)
            return
        stages.mark_done(out, json.dumps({"seconds": round(time.time() - t0, 1), "world_size": dist.world_size}) + "\n")
        log.info("stage %s: done in %.1f s", name, time.time() - t0)
        if name != names[-1] and stop.should_stop():  # collective; a signal during a stage without a loop
            log.info("%s: stopping before the next stage; rerun to continue", stop.signal_name)
            return


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
