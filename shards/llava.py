"""LLaVA SFT json (llava_v1_5_mix665k.json format) -> WebDataset tar shards.

    python -m shards.llava --json llava_v1_5_mix665k.json --image-root DIR --out DIR \
        [--maxcount N] [--maxsize BYTES] [--prefix llava] [--overwrite]

Each record `{id, image?, conversations: [{from, value}]}` becomes a sample: `__key__` (the
record's index, zero-padded: LLaVA ids may hold dots or slashes, which webdataset reads as
extensions or folders), the image bytes as stored (`jpg`/`png`/..., not re-encoded) and
`json` (the record as is, original id included). Text-only records get no image member.

The json may come from anywhere; the image root is yours. An image path must stay inside
`--image-root`: an absolute path, or one whose `..` climbs out, is refused and never opened
(symlinks placed inside the root are followed). A record that cannot be a sample (not an
object, conversations not a list of {from, value} strings, `image` not a string, text that
is not UTF-8 such as a lone surrogate, image outside the root, missing or unreadable) is not
written: each is printed (first 20), listed with its index and reason in `skipped.jsonl`,
and counted by reason in the final summary. A json file that is unreadable, not UTF-8 or
not JSON ends the run with one line naming it (exit status 1).

Output is written into `OUT.partial` and moved to `OUT` when complete, so the tars,
`sizes.json` (samples per shard) and `skipped.jsonl` appear together or not at all. A
non-empty `OUT` is refused unless `--overwrite`, which replaces a previous conversion (and
refuses a folder holding files no conversion writes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from collections import Counter

from PIL import Image

TAR_MTIME = 946684800  # fixed: the same input gives the same tar bytes
PRINT_SKIPS = 20
OUTPUTS = ("sizes.json", "skipped.jsonl")  # besides the *.tar shards: what a conversion writes


class ConvertError(Exception):
    """A bad input file or --out: one line for the user, no traceback."""


def read_image(path: str):
    """(extension, bytes as stored) or raise: the bytes must open as an image PIL can verify."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.verify()  # header and structure; cheap, no full decode
    ext = os.path.splitext(path)[1].lower().lstrip(".") or (fmt or "").lower()
    return {"jpeg": "jpg"}.get(ext, ext), data


def load_records(path: str) -> list:
    """The json's list of records, or ConvertError naming the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            records = json.load(f)
    except OSError as e:
        raise ConvertError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise ConvertError(f"{path}: nested too deeply to parse") from None
    if not isinstance(records, list):
        raise ConvertError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def record_problem(rec) -> str | None:
    """Why a record cannot become a sample (None: it can). Its shape only: roles and image
    markers are the loader's (pipeline/data/template.py), as for any shard."""
    if not isinstance(rec, dict):
        return "not_an_object"
    turns = rec.get("conversations")
    if not (
        isinstance(turns, list)
        and turns
        and all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns
        )
    ):
        return "bad_conversations"
    image = rec.get("image")
    if image is not None and (not isinstance(image, str) or "\0" in image):
        return "bad_image_field"
    try:  # JSON may escape a lone surrogate (\ud800); UTF-8 cannot hold it
        json.dumps(rec, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return "bad_text"
    return None


def image_path(root: str, image: str) -> str | None:
    """The file `image` names under `root`, or None when it lies outside (absolute, or `..`
    climbing out). Normalised before it is checked, and that path is the one opened."""
    if os.path.isabs(image):
        return None
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, image))
    return path if os.path.commonpath([root, path]) == root else None


def check_out(out: str, overwrite: bool) -> None:
    """A non-empty --out only with --overwrite, and only if all it holds is a conversion's."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConvertError(f"--out {out}: not a folder")
    names = sorted(os.listdir(out))
    if names and not overwrite:
        raise ConvertError(
            f"--out {out} is not empty ({len(names)} entries): old shards would mix with the new "
            "(exact mode reads every *.tar); --overwrite replaces a previous conversion"
        )
    foreign = [n for n in names if not (n.endswith(".tar") or n in OUTPUTS)]
    if foreign:
        raise ConvertError(f"--out {out} holds files no conversion writes ({foreign[:5]}): not replacing it")


def convert(
    records: list,
    image_root: str,
    out: str,
    *,
    maxcount: int = 10000,
    maxsize: float = 1e9,
    prefix: str = "llava",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    import webdataset as wds
    from tqdm import tqdm

    out = os.path.normpath(out)
    check_out(out, overwrite)
    partial = out + ".partial"  # a crashed run's is ours to remove
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    counts, summary, skipped = Counter(), Counter(), []
    with wds.ShardWriter(
        os.path.join(partial, f"{prefix}-%06d.tar"),
        maxcount=maxcount,
        maxsize=maxsize,
        verbose=0,
        mtime=TAR_MTIME,
        user="llava",
        group="llava",
    ) as sink:
        bar = tqdm(records, desc="llava -> shards", unit="sample", disable=not progress)
        for i, rec in enumerate(bar):
            sample, error = {"__key__": f"{i:09d}"}, None
            reason = record_problem(rec)
            if reason is None and rec.get("image"):
                path = image_path(image_root, rec["image"])
                if path is None:
                    reason = "outside_image_root"
                elif not os.path.isfile(path):
                    reason = "missing_image"
                else:
                    try:
                        ext, data = read_image(path)
                        sample[ext] = data
                    except Exception as exn:  # PIL raises several kinds
                        reason, error = "unreadable_image", repr(exn)[:200]
            if reason:
                summary["skipped " + reason] += 1
                rid, image = (rec.get("id"), rec.get("image")) if isinstance(rec, dict) else (None, None)
                skipped.append(
                    {"index": i, "id": rid, "image": image, "reason": reason, **({"error": error} if error else {})}
                )
                if len(skipped) <= PRINT_SKIPS:  # repr: an id may hold what the terminal cannot print
                    bar.write(f"skip {reason}: record {i} id={rid!r} image={image!r}")
                continue
            sample["json"] = json.dumps(rec, ensure_ascii=False, sort_keys=True).encode()
            sink.write(sample)
            counts[os.path.basename(sink.fname)] += 1
            summary["written"] += 1
            summary["text-only" if len(sample) == 2 else "with image"] += 1
    for name in os.listdir(partial):  # ShardWriter opens its first tar before any sample
        if name.endswith(".tar") and name not in counts:
            os.remove(os.path.join(partial, name))
    with open(os.path.join(partial, "sizes.json"), "w") as f:
        json.dump(dict(sorted(counts.items())), f, indent=1)
    with open(os.path.join(partial, "skipped.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    _publish(partial, out)
    summary["shards"] = len(counts)
    return dict(summary)


def _publish(partial: str, out: str) -> None:
    """Move the finished folder to `out`; an existing `out` (empty or a previous conversion,
    see check_out) is set aside first and removed once the new one is in place."""
    if not os.path.exists(out):
        os.rename(partial, out)
        return
    old = out + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old)


def main(argv=None):
    p = argparse.ArgumentParser(description="LLaVA SFT json -> WebDataset shards")
    p.add_argument("--json", required=True, help="e.g. llava_v1_5_mix665k.json")
    p.add_argument("--image-root", required=True, help="folder the records' `image` paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard, at most")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard, about (checked before each write)")
    p.add_argument("--prefix", default="llava")
    p.add_argument("--overwrite", action="store_true", help="replace the shards of a previous conversion in --out")
    a = p.parse_args(argv)
    try:
        check_out(os.path.normpath(a.out), a.overwrite)  # before reading a large json
        records = load_records(a.json)
        s = convert(
            records, a.image_root, a.out, maxcount=a.maxcount, maxsize=a.maxsize, prefix=a.prefix, overwrite=a.overwrite
        )
    except ConvertError as e:
        sys.exit(f"shards.llava: {e}")
    skips = ", ".join(f"{k[8:]} {v}" for k, v in sorted(s.items()) if k.startswith("skipped ")) or "none"
    print(
        f"records {len(records)}: written {s.get('written', 0)} ({s.get('with image', 0)} with image, "
        f"{s.get('text-only', 0)} text-only) in {s['shards']} shards; skipped: {skips}"
        f" (ids in {os.path.join(a.out, 'skipped.jsonl')})"
    )


if __name__ == "__main__":
    main()
