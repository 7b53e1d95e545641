"""Count, verify and show the samples of a shard folder (or brace pattern).

    python -m shards.inspect DIR [--show N]

Every tar member is decoded (images fully, json parsed); per-shard counts are checked
against sizes.json. Exit status 1 if anything fails to read or disagrees.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
from collections import Counter

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def check_member(ext: str, data: bytes):
    """Decoded value of one member (raises when it does not decode)."""
    if ext in IMAGE_EXTS:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    if ext == "json":
        return json.loads(data)
    return data


def inspect(spec: str, show: int = 3, out=sys.stdout) -> int:
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(spec, "*.tar"))) if os.path.isdir(spec) else wds.shardlists.expand_urls(spec)
    sizes = {}
    if os.path.isdir(spec) and os.path.exists(os.path.join(spec, "sizes.json")):
        with open(os.path.join(spec, "sizes.json")) as f:
            sizes = json.load(f)
    errors, counts, members, shown = [], Counter(), Counter(), 0

    def on_error(exn):
        errors.append(repr(exn)[:300])
        return True

    for url in urls:
        name = os.path.basename(url)
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=on_error)):
            counts[name] += 1
            decoded = {}
            for ext, data in sample.items():
                if ext.startswith("__"):
                    continue
                members[ext] += 1
                try:
                    decoded[ext] = check_member(ext, data)
                except Exception as exn:
                    errors.append(f"{name} {sample['__key__']}.{ext}: {exn!r}"[:300])
            if shown < show:
                shown += 1
                print(f"--- {sample['__key__']} ({name})", file=out)
                for ext, v in decoded.items():
                    if isinstance(v, Image.Image):
                        print(f"  {ext}: {v.size[0]}x{v.size[1]} {v.mode}", file=out)
                    elif isinstance(v, dict):
                        extra = {k: v[k] for k in ("id", "family", "qtype") if k in v}
                        print(f"  {ext}: {extra}", file=out)
                        for turn in v.get("conversations", [])[:6]:
                            print(f"    {turn.get('from')}: {str(turn.get('value'))[:100]!r}", file=out)
        if sizes and sizes.get(name) != counts[name]:
            errors.append(f"{name}: {counts[name]} samples, sizes.json says {sizes.get(name)}")
    print(f"{len(urls)} shards, {sum(counts.values())} samples; members: {dict(members)}", file=out)
    for e in errors[:50]:
        print("ERROR", e, file=out)
    print(f"{len(errors)} errors", file=out)
    return 1 if errors else 0


def main(argv=None):
    p = argparse.ArgumentParser(description="count, verify and show shard samples")
    p.add_argument("shards", help="folder of .tar shards or a brace pattern")
    p.add_argument("--show", type=int, default=3)
    a = p.parse_args(argv)
    sys.exit(inspect(a.shards, a.show))


if __name__ == "__main__":
    main()
