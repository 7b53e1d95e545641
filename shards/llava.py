"""LLaVA SFT json (llava_v1_5_mix665k.json format) -> WebDataset tar shards.

    python -m shards.llava --json llava_v1_5_mix665k.json --image-root DIR --out DIR \
        [--maxcount N] [--maxsize BYTES] [--prefix llava]

Each record `{id, image?, conversations: [{from, value}]}` becomes a sample: `__key__` (the
record's index, zero-padded: LLaVA ids may hold dots or slashes, which webdataset reads as
extensions or folders), the image bytes as stored (`jpg`/`png`/..., not re-encoded) and
`json` (the record as is, original id included). Text-only records get no image member.
Records whose image is missing or unreadable are not written: each is printed (first 20)
and listed with its reason in `skipped.jsonl`, and counted in the final summary.
`sizes.json` (samples per shard) is written beside the shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from collections import Counter

from PIL import Image

TAR_MTIME = 946684800  # fixed: the same input gives the same tar bytes
PRINT_SKIPS = 20


def read_image(path: str):
    """(extension, bytes as stored) or raise: the bytes must open as an image PIL can verify."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.verify()  # header and structure; cheap, no full decode
    ext = os.path.splitext(path)[1].lower().lstrip(".") or (fmt or "").lower()
    return {"jpeg": "jpg"}.get(ext, ext), data


def convert(
    records: list,
    image_root: str,
    out: str,
    *,
    maxcount: int = 10000,
    maxsize: float = 1e9,
    prefix: str = "llava",
    progress: bool = True,
) -> dict:
    import webdataset as wds
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    counts, summary, skipped = Counter(), Counter(), []
    with wds.ShardWriter(
        os.path.join(out, f"{prefix}-%06d.tar"),
        maxcount=maxcount,
        maxsize=maxsize,
        verbose=0,
        mtime=TAR_MTIME,
        user="llava",
        group="llava",
    ) as sink:
        bar = tqdm(records, desc="llava -> shards", unit="sample", disable=not progress)
        for i, rec in enumerate(bar):
            sample, reason = {"__key__": f"{i:09d}"}, None
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
                reason = "bad_record"
            elif rec.get("image"):
                path = os.path.join(image_root, rec["image"])
                if not os.path.exists(path):
                    reason = "missing_image"
                else:
                    try:
                        ext, data = read_image(path)
                        sample[ext] = data
                    except Exception as exn:  # PIL raises several kinds
                        reason = "unreadable_image"
                        rec = dict(rec, error=repr(exn)[:200])
            if reason:
                summary["skipped " + reason] += 1
                skipped.append(
                    {
                        "id": rid,
                        "image": rec.get("image") if isinstance(rec, dict) else None,
                        "reason": reason,
                        **({"error": rec["error"]} if "error" in rec else {}),
                    }
                )
                if len(skipped) <= PRINT_SKIPS:
                    bar.write(f"skip {reason}: id={rid} image={skipped[-1]['image']}")
                continue
            sample["json"] = json.dumps(rec, ensure_ascii=False, sort_keys=True).encode()
            sink.write(sample)
            counts[os.path.basename(sink.fname)] += 1
            summary["written"] += 1
            summary["text-only" if len(sample) == 2 else "with image"] += 1
    with open(os.path.join(out, "sizes.json"), "w") as f:
        json.dump(dict(sorted(counts.items())), f, indent=1)
    with open(os.path.join(out, "skipped.jsonl"), "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in skipped)
    summary["shards"] = len(counts)
    return dict(summary)


def main(argv=None):
    p = argparse.ArgumentParser(description="LLaVA SFT json -> WebDataset shards")
    p.add_argument("--json", required=True, help="e.g. llava_v1_5_mix665k.json")
    p.add_argument("--image-root", required=True, help="folder the records' `image` paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard, at most")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard, about (checked before each write)")
    p.add_argument("--prefix", default="llava")
    a = p.parse_args(argv)
    with open(a.json) as f:
        records = json.load(f)
    s = convert(records, a.image_root, a.out, maxcount=a.maxcount, maxsize=a.maxsize, prefix=a.prefix)
    skips = ", ".join(f"{k[8:]} {v}" for k, v in sorted(s.items()) if k.startswith("skipped ")) or "none"
    print(
        f"records {len(records)}: written {s.get('written', 0)} ({s.get('with image', 0)} with image, "
        f"{s.get('text-only', 0)} text-only) in {s['shards']} shards; skipped: {skips}"
        f" (ids in {os.path.join(a.out, 'skipped.jsonl')})"
    )


if __name__ == "__main__":
    main()
