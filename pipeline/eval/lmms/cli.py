"""`python -m pipeline.eval.lmms`: lmms-eval on an exported checkpoint, failing loudly.

    python -m pipeline.eval.lmms eval --model-dir runs/default/export --tasks paper7 \\
        --data-root /data/lmms_local --output runs/default/lmms [--pruning atp|none|fixed] \\
        [--batch-size 8] [--limit N] [--include-path DIR ...] [-- more lmms-eval arguments]
    python -m pipeline.eval.lmms convert-synthetic --shards data/synthetic/eval --out runs/lmms/synthetic
    python -m pipeline.eval.lmms tasks          # the offline tasks, their files, how to make them

`eval` runs lmms-eval's own CLI (`python -m lmms_eval eval --model atp_llava ...`) in a child
process with every task folder mirrored into OUTPUT/tasks (the offline benchmarks of
`pipeline/eval/lmms/tasks/` with `data` linked to --data-root, and each --include-path), then
checks what lmms-eval's exit status does not: lmms-eval catches a failing task or model and
still exits 0. Failure (exit 1, the reason on stderr): a non-zero exit, "Error during
evaluation" in its log, no new `*_results.json` under OUTPUT, or a requested task missing
from it. Missing local data files are found before anything runs (exit 2). On success the
plugin's token statistics are moved beside the results file as `<date>_atp_tokens.json`
and a summary (scores, N_bar) is printed. The hub is off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE)
unless --online.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
GROUPS = {  # the paper's Table 1 benchmarks
    "paper7": [
        "gqa_local",
        "mmbench_en_dev_local",
        "mme_local",
        "pope_local",
        "seedbench_local",
        "scienceqa_img_local",
        "vqav2_val_local",
    ],
}
STATS_NAME = "atp_tokens.json"


class EvalFailed(Exception):
    pass


# ------------------------------------------------------------------ task folders


def _read_yaml(path: Path) -> dict:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader) or {}


def offline_tasks(tasks_dir: Path = TASKS_DIR) -> dict[str, dict]:
    """task name -> {yaml, files (data_files relative to the YAML's dir), make (how to create them)}."""
    out = {}
    for path in sorted(tasks_dir.glob("*.yaml")):
        cfg = _read_yaml(path)
        files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
        files = list(files.values()) if isinstance(files, dict) else [files] if isinstance(files, str) else files
        if path.stem == "gqa_local":
            files = files + ["data/gqa/testdev_balanced_images.parquet"]
        make = [
            line[1:].strip()
            for line in path.read_text().splitlines()
            if line.startswith("#") and "load_dataset(" in line
        ]
        out[cfg["task"]] = dict(yaml=path, files=files, make=make)
    return out


def _mirror(src: Path, dst: Path) -> None:
    """dst mirrors src's folders with a symlink per file (lmms-eval walks folders without
    following folder links; relative `data_files` then resolve beside each link)."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d not in ("data", "__pycache__") and not d.startswith(".")]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            link = dst / rel / name
            if not link.exists():
                link.symlink_to(Path(root, name).resolve())
        data = Path(root) / "data"
        if data.exists() and not (dst / rel / "data").exists():
            (dst / rel / "data").symlink_to(data.resolve())


def prepare_tasks(out: Path, data_root: str | None, include: list[str]) -> Path:
    """OUTPUT/tasks: `offline/` (the seven benchmarks, data -> data_root) and `include<i>/`."""
    root = out / "tasks"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    offline = root / "offline"
    _mirror(TASKS_DIR, offline)
    if data_root is not None:
        link = offline / "data"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(data_root).resolve())
    for i, src in enumerate(include):
        if not Path(src).is_dir():
            raise EvalFailed(f"--include-path {src}: not a folder")
        _mirror(Path(src), root / f"include{i}")
    return root


def missing_data(tasks: list[str], root: Path) -> list[str]:
    """Lines naming each requested offline task's missing file and how to make it."""
    known = offline_tasks(root / "offline")
    lines = []
    for task in tasks:
        if task not in known:
            continue
        for rel in known[task]["files"]:
            if not (root / "offline" / rel).is_file():
                lines.append(f"{task}: missing {rel.replace('data/', 'DATA_ROOT/', 1)}")
                lines += [f"    make it with: {m}" for m in known[task]["make"]]
    return lines


# ------------------------------------------------------------------ results


def find_results(out: Path, since: float) -> Path | None:
    """The newest OUTPUT/<model>/<date>_results.json written since `since` (task aggregations
    write their own files under OUTPUT/submissions/)."""
    found = [
        p
        for p in out.glob("*/*_results.json")
        if p.parent.name not in ("submissions", "tasks") and p.stat().st_mtime >= since - 1
    ]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def check_results(path: Path | None, tasks: list[str], log_text: str, returncode: int) -> dict:
    """lmms-eval's results dict, or EvalFailed saying why not."""
    problems = []
    if returncode != 0:
        problems.append(f"lmms-eval exited with status {returncode}")
    errors = [line.strip() for line in log_text.splitlines() if "Error during evaluation" in line]
    problems += errors[:5]
    if "Model 'atp_llava' not found" in log_text:
        problems.append(
            "lmms-eval did not see the atp_llava entry point: reinstall the project "
            "(pip install -e .); a stale atp_llava.egg-info in the working directory hides it"
        )
    if path is None:
        problems.append("lmms-eval wrote no *_results.json")
        raise EvalFailed("; ".join(problems))
    results = json.loads(path.read_text())
    have = results.get("results", {})
    missing = [t for t in tasks if t not in have and t not in results.get("groups", {})]
    if missing:
        problems.append(f"no results for tasks {missing} in {path}")
    if problems:
        raise EvalFailed("; ".join(problems))
    return results


def scores(results: dict) -> dict[str, dict[str, float]]:
    """task -> {metric: value} for the numeric metrics (no stderr entries)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k
        }
    return out


# ------------------------------------------------------------------ eval


def expand_tasks(spec: str) -> list[str]:
    tasks = []
    for name in (t.strip() for t in spec.split(",")):
        if name:
            tasks += GROUPS.get(name, [name])
    return list(dict.fromkeys(tasks))


def lmms_eval_command(args, tasks: list[str], task_root: Path, stats_tmp: Path) -> list[str]:
    model_args = [f"pretrained={Path(args.model_dir).resolve()}", f"stats_path={stats_tmp}"]
    if args.pruning:
        model_args.append(f"pruning={args.pruning}")
    if args.fixed_counts:
        model_args.append(f"fixed_counts={args.fixed_counts}")
    if args.device:
        model_args.append(f"device={args.device}")
    if args.model_args:
        model_args.append(args.model_args)
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "eval",
        "--model",
        "atp_llava",
        "--model_args",
        ",".join(model_args),
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(task_root),
        "--batch_size",
        str(args.batch_size),
        "--output_path",
        str(Path(args.output).resolve()),
        "--log_samples",
    ]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return cmd + list(args.extra)


def run_eval(args) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tasks = expand_tasks(args.tasks)
    if not tasks:
        print("error: --tasks names no task", file=sys.stderr)
        return 2
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"error: --model-dir {args.model_dir}: no config.json (an export dir is expected)", file=sys.stderr)
        return 2
    try:
        task_root = prepare_tasks(out, args.data_root, args.include_path)
    except EvalFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = missing_data(tasks, task_root)
    if missing:
        print(
            "error: local benchmark data missing (--data-root DIR holds it):\n  " + "\n  ".join(missing),
            file=sys.stderr,
        )
        return 2

    stats_tmp = out / f".{STATS_NAME}.partial"
    stats_tmp.unlink(missing_ok=True)
    cmd = lmms_eval_command(args, tasks, task_root, stats_tmp)
    env = dict(os.environ)
    if not args.online:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path = out / "lmms_eval.log"
    print("+ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
        )
        for line in proc.stdout:
            log.write(line)
            if not args.quiet:
                sys.stdout.write(line)
        returncode = proc.wait()
    log_text = log_path.read_text(errors="replace")
    results_path = find_results(out, start)
    try:
        results = check_results(results_path, tasks, log_text, returncode)
    except EvalFailed as e:
        print(f"\nFAILED: {e}\n(lmms-eval's output: {log_path})", file=sys.stderr)
        return 1

    date_id = results_path.name[: -len("_results.json")]
    stats_path = results_path.with_name(f"{date_id}_{STATS_NAME}")
    stats = None
    if stats_tmp.exists():
        stats_tmp.replace(stats_path)
        stats = json.loads(stats_path.read_text())
    else:
        print(f"warning: the plugin wrote no token statistics ({stats_tmp})", file=sys.stderr)
    print(f"\nresults: {results_path}")
    if stats is not None:
        print(f"token statistics: {stats_path}")
    for task, metrics in scores(results).items():
        line = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not math.isnan(v))
        n_bar = ((stats or {}).get("tasks", {}).get(task) or {}).get("n_bar")
        print(f"  {task}: {line}" + (f" | N_bar {n_bar:.2f}" if n_bar is not None else ""))
    return 0


# ------------------------------------------------------------------ command line


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(prog="python -m pipeline.eval.lmms", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="run lmms-eval on an export dir and check its results")
    e.add_argument("--model-dir", required=True, help="an export dir (python -m pipeline stage export)")
    e.add_argument("--tasks", required=True, help=f"comma-separated task names; groups: {sorted(GROUPS)}")
    e.add_argument("--output", required=True, help="lmms-eval's --output_path (results, samples, log)")
    e.add_argument("--data-root", help="folder with the offline benchmarks' local copies (`tasks` lists them)")
    e.add_argument("--include-path", action="append", default=[], help="a further task folder (repeatable)")
    e.add_argument("--pruning", help="atp | none | fixed | a registered baseline (default: the checkpoint's)")
    e.add_argument("--fixed-counts", help="pruning=fixed: tokens kept per ATP layer, e.g. 126/88/20")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--limit", type=float, help="first N docs per task (a fraction if < 1): testing only")
    e.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    e.add_argument("--model-args", help="further model_args for the plugin, k=v,k=v")
    e.add_argument("--online", action="store_true", help="let datasets/hub reach the network")
    e.add_argument("--quiet", action="store_true", help="lmms-eval's output to the log file only")
    c = sub.add_parser("convert-synthetic", help="synthetic eval shards -> local tasks synthetic_vqa, synthetic_mc")
    c.add_argument("--shards", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--limit", type=int, help="first N samples")
    sub.add_parser("tasks", help="the offline benchmark tasks and the local files each needs")
    args = p.parse_args(argv)
    args.extra = extra

    if args.cmd == "eval":
        return run_eval(args)
    if args.cmd == "convert-synthetic":
        from pipeline.eval.lmms.synthetic import convert

        out = convert(args.shards, args.out, args.limit)
        print(f"wrote {out}: tasks synthetic_vqa, synthetic_mc (use --include-path {out})")
        return 0
    for task, info in offline_tasks().items():
        print(f"{task}  ({info['yaml'].name})")
        for rel in info["files"]:
            print(f"    {rel.replace('data/', 'DATA_ROOT/', 1)}")
        for m in info["make"]:
            print(f"    # {m}")
    for name, members in GROUPS.items():
        print(f"group {name}: {','.join(members)}")
    return 0
