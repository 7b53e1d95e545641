"""Compare two pipeline output folders record by record: every report.json under them (records and
summary, all fields but timings and the environment) and every metrics.jsonl (every scalar but
the measured ones: perf/* times, mem/* peak memory). Exit 1 on a difference. Used to hold a
refactor to "behaviour unchanged":

    python scripts/compare_runs.py OUT_BEFORE OUT_AFTER [--keys-of-before]

--keys-of-before compares each record (and each metrics.jsonl line) on the keys BEFORE's has: a
report written before the record schema grew a field (pipeline/eval/records.py), or a run from
before a scalar was logged, is then not different for lacking it.
"""

import json
import sys
from pathlib import Path

# measured in the process, or describing it: differ between any two runs
VOLATILE = ("eval_seconds", "device", "date", "models", "title", "torch_threads")
TIMED = ("prefill", "decode", "timing", "_ms")
MEASURED = ("perf/", "mem/")  # metrics.jsonl: times and peak memory of this process


def stable(x):
    """`x` without timings and environment fields, at any depth."""
    if isinstance(x, dict):
        return {k: stable(v) for k, v in x.items() if k not in VOLATILE and not any(t in k for t in TIMED)}
    if isinstance(x, list):
        return [stable(v) for v in x]
    return x


def files(root: Path, name: str) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob(name))


def on_keys_of(before: list[dict], after: list[dict]) -> list[dict]:
    """AFTER's records cut to the keys of BEFORE's record at the same place (--keys-of-before)."""
    return [{k: v for k, v in y.items() if k in x} for x, y in zip(before, after)] + after[len(before) :]


def compare_reports(a: Path, b: Path, keys_of_before: bool = False) -> int:
    bad = 0
    for rel in files(a, "report.json"):
        ja, jb = (json.loads((d / rel).read_text()) for d in (a, b))
        ra, rb = stable(ja["records"]), stable(jb["records"])
        if keys_of_before:  # a key BEFORE lacks is a newer field, not a difference
            rb = on_keys_of(ra, rb)
        differ = [x for x, y in zip(ra, rb) if x != y]
        n = len(differ) + abs(len(ra) - len(rb))
        summary = stable(ja.get("summary")) == stable(jb.get("summary"))
        print(f"{rel}: {len(ra)} records, {n} differ (accuracy, n_bar, tokens per layer, FLOPs, KV, ...); ", end="")
        print(f"summary {'same' if summary else 'DIFFERS'}")
        for x, y in zip(ra, rb):
            if x != y:
                print(
                    "  ",
                    x["method"],
                    x["budget"],
                    {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)},
                )
        bad += n + (not summary)
    return bad


def compare_metrics(a: Path, b: Path, keys_of_before: bool = False) -> int:
    bad = 0
    for rel in files(a, "metrics.jsonl"):
        ca, cb = (
            [
                {k: v for k, v in json.loads(line).items() if not k.startswith(MEASURED)}
                for line in (d / rel).read_text().splitlines()
            ]
            for d in (a, b)
        )
        if keys_of_before:  # a scalar BEFORE never logged is a newer one, not a difference
            newer = sorted({k for x, y in zip(ca, cb) for k in y.keys() - x.keys()})
            cb = on_keys_of(ca, cb)
            if newer:
                print(f"{rel}: scalars only AFTER logs, not compared: {', '.join(newer)}")
        n = sum(x != y for x, y in zip(ca, cb)) + abs(len(ca) - len(cb))
        print(f"{rel}: {len(ca)} lines, {n} differ (every scalar but perf/*, mem/*)")
        bad += n
    return bad


def main(argv) -> int:
    keys_of_before = "--keys-of-before" in argv
    a, b = (Path(x) for x in argv if x != "--keys-of-before")
    for name in ("report.json", "metrics.jsonl"):
        if files(a, name) != files(b, name):
            print(f"different {name} files: {files(a, name)} vs {files(b, name)}")
            return 1
    bad = compare_reports(a, b, keys_of_before) + compare_metrics(a, b, keys_of_before)
    print("IDENTICAL" if not bad else f"DIFFERENT ({bad})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
