"""Streaming WebDataset loader: shards -> LLaVA-1.5 (vicuna_v1) training batches.

Stages (one `wds.DataPipeline` per rank, run in the DataLoader workers):

    shard list (brace pattern or folder)
      exact:     SimpleShardList (the same shuffled order in every reader) -> tarfile_to_samples
                 -> shuffle buffer (the same seed in every reader) -> number the samples
                 (the epoch's global positions) -> keep this reader's micro-batches
      resampled: ResampledShards (with replacement; seed per rank, worker and epoch)
                 -> tarfile_to_samples -> shuffle buffer (seed per rank, worker and epoch)
    -> decode (PIL, json) -> prepare (template, tokenise, label-mask, CLIP preprocess)
    -> batched (pad; exact: one batch per micro-batch of positions) -> attach skip counts

Conventions (other modules rely on them):
- Batch: input_ids / attention_mask / labels [B, L] long, query_mask [B, L] bool,
  image_start [B] long (index of the first image token, -1 for text-only), has_image [B]
  bool, pixel_values [n_img, 3, H, W] for the samples with an image in batch order, or None
  when no sample in the batch has one. Text-only samples get NO pixel_values and no image
  tokens (not LLaVA's zero-image convention). keys: list[str], meta: list[dict] (the json's
  family, qtype, answer, id when present). Training batches are right-padded with
  pad_token_id; generation prompts (`generation=True`, `build_prompt_batch`) are
  left-padded, end with "ASSISTANT:" and carry `answers` (the reference, or None).
- Bad samples are skipped through webdataset's `handler=` mechanism, counted by kind and
  logged once (with the key) by the process that met them. `max_consecutive_bad` of them in
  a row in one stream (rank x worker) raise TooManyBadSamples: an error that hits every
  sample (a template or tokenizer problem, shards of the wrong format) stops the run
  instead of skipping forever. The counts travel to the main
  process inside the batches (`skipped` deltas, plus a counts-only item at the end of a
  worker's stream) and `Loader.stats` (a Counter) accumulates them; `truncated` and
  `converted_image` count samples that were repaired, not skipped; `lost_samples` the
  samples a shard lacks against its sizes.json (a tar cut short).
- Exact mode: each sample once per epoch, in one global order that depends on (seed, epoch)
  only, not on the world size or the workers. From position `start` on, the order is cut
  into micro-batches of `batch_size` positions; micro-batch c goes to rank c % world_size
  (and, within the rank, to DataLoader worker (c // world_size) % num_workers, which the
  DataLoader's round robin returns in order). A run that consumed P samples therefore
  resumes at `start=P` on any world size and batch size without repeating or missing a
  sample of the epoch. Every reader reads every shard's bytes (decoding only its own
  samples): world_size x num_workers reads of the data per epoch, from the page cache on
  one node. A bad sample leaves its micro-batch short; a micro-batch with no good sample
  leaves a counts-only item, so later ones keep their ranks and order. Shard-level errors
  (a bad tar, lost samples) are counted by the reader of rank 0, worker 0 only.
  `drop_last=True` gives every rank exactly `num_batches` = (N - start) // (world_size x
  batch_size) batches (N from sizes.json), what training needs.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import re
import time
from collections import Counter
from functools import partial

import torch
import webdataset as wds
from PIL import Image
from webdataset.autodecode import DecodingError
from webdataset.utils import make_seed

from pipeline.core.config import DataConfig  # the schema lives with the run config
from pipeline.data.template import IGNORE_INDEX, IMAGE_MARKER, BadSample, encode, parse_conversation, preprocess_image

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LOG_LINES_PER_KIND = 20  # per process; the counts stay complete


# ---------------------------------------------------------------- shard list


def list_shards(spec: str) -> list[str]:
    """A folder's *.tar (sorted) or a brace pattern's expansion."""
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")) + glob.glob(os.path.join(spec, "*.tar.gz")))
    else:
        urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f"no shards in {spec!r}")
    return urls


def shard_size(url: str, cache: dict) -> int | None:
    """Samples in one shard according to the sizes.json beside it (None if unknown);
    `cache` keeps each folder's sizes.json."""
    folder = os.path.dirname(url)
    if folder not in cache:
        try:
            with open(os.path.join(folder, "sizes.json")) as f:
                cache[folder] = json.load(f)
        except (OSError, ValueError):
            cache[folder] = {}
    return cache[folder].get(os.path.basename(url))


def dataset_size(urls: list[str]) -> int | None:
    """Samples in these shards according to the sizes.json beside them (None if unknown)."""
    cache = {}
    sizes = [shard_size(url, cache) for url in urls]
    return None if None in sizes else sum(sizes)


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info else 0


def _worker_seed(rank: int) -> int:
    return rank * 1000 + _worker_id()


def _shuffle(src, bufsize: int, seed: int, epoch: int, rank: int | None):
    # the seed is made inside the worker, so every (rank, worker, epoch) shuffles differently;
    # rank None (exact mode): every reader shuffles alike, the global order
    reader = () if rank is None else (rank, _worker_id())
    yield from wds.shuffle(bufsize, initial=min(bufsize, 100), seed=make_seed(seed, epoch, *reader))(src)


def _num_workers() -> int:
    info = torch.utils.data.get_worker_info()
    return info.num_workers if info else 1


def _own_positions(src, start: int, batch_size: int, rank: int, world_size: int):
    """Exact mode: number the global order and keep this reader's micro-batches from `start`
    on (before decoding: the others' samples cost only their bytes)."""
    workers, worker = _num_workers(), _worker_id()
    for pos, sample in enumerate(src):
        if pos < start:
            continue
        chunk = (pos - start) // batch_size
        if chunk % world_size == rank and (chunk // world_size) % workers == worker:
            sample["__chunk__"] = chunk
            yield sample


def _batch_chunks(src, collation_fn, world_size: int):
    """Exact mode: one batch per micro-batch of positions; `{}` (a counts-only item) for one
    whose samples were all bad, so the DataLoader's round robin keeps the order."""
    stride = world_size * _num_workers()
    group, current, expected = [], None, None
    for sample in src:
        chunk = sample.pop("__chunk__")
        if chunk != current:
            if group:
                yield collation_fn(group)
            expected = chunk if expected is None else expected + stride
            while expected < chunk:
                yield {}
                expected += stride
            group, current = [], chunk
        group.append(sample)
    if group:
        yield collation_fn(group)


# ---------------------------------------------------------------- bad samples


class TooManyBadSamples(RuntimeError):
    """`data.max_consecutive_bad` samples in a row were bad: the data or its template is wrong."""


class SkipCounter:
    """The `handler=` of every stage: counts by kind, logs each skipped sample once, continues,
    until `limit` errors in a row without a good sample (`good()`) raise TooManyBadSamples.
    `shard_errors(rank)`: whether this reader counts shard-level errors (exact mode: every
    reader reads every shard, so only rank 0's worker 0 does)."""

    def __init__(self, limit: int | None = None, shard_errors=lambda: True):
        self.pending = Counter()  # not yet handed to the main process
        self.lines = Counter()
        self.bad_shards = set()
        self.limit, self.in_row, self.seen = limit, 0, Counter()
        self.shard_errors = shard_errors

    def good(self) -> None:
        if self.in_row:
            self.in_row = 0
            self.seen.clear()

    def count(self, kind: str, key=None, detail: str = ""):
        self.pending[kind] += 1
        if key is not None:  # repaired samples (truncated, converted) are counted, not logged
            self.lines[kind] += 1
            if self.lines[kind] <= LOG_LINES_PER_KIND:
                log.warning("skipped sample (%s) %s: %s", kind, key, detail)
            if self.lines[kind] == LOG_LINES_PER_KIND:
                log.warning("further %s skips are counted but not logged", kind)

    def handler(self, exn: Exception) -> bool:
        if isinstance(exn, BadSample):
            self.count(exn.kind, exn.key, exn.detail)
        elif isinstance(exn, DecodingError):
            kind = "malformed_json" if exn.k == "json" else "bad_image" if exn.k in IMAGE_EXTS else "bad_member"
            self.count(kind, exn.key, f"{exn.k}: {exn.__cause__!r}")
        else:  # raised while opening or reading a tar: corrupt / truncated shard
            # webdataset appends the url to args at the shard level; inside a tar only the
            # stream's repr names the file. One count per shard, however many errors it raises.
            url = next(
                (a for a in reversed(exn.args) if isinstance(a, str) and not a.startswith(str(exn.args[0]))), None
            )
            found = re.search(r"name='([^']+)'", str(exn))
            where = url or (found.group(1) if found else "?")
            if where not in self.bad_shards and self.shard_errors():
                self.bad_shards.add(where)
                self.count("bad_tar", where, str(exn.args[0])[:120] if exn.args else repr(exn))
        # every error counts here, a bad shard met again (resampled) included
        self.in_row += 1
        self.seen[getattr(exn, "kind", type(exn).__name__)] += 1
        if self.limit is not None and self.in_row >= self.limit:
            raise TooManyBadSamples(
                f"{self.in_row} bad samples in a row (data.max_consecutive_bad={self.limit}), by kind "
                f"{dict(self.seen)}; the last: {exn!r}. Every sample fails: check the shards' format and the "
                "conversation template (the warnings above name the samples)"
            ) from None
        return True  # skip and go on

    def take(self) -> dict:
        out, self.pending = dict(self.pending), Counter()
        return out


def _read_shards(src, stats: SkipCounter):
    """tarfile_to_samples one shard at a time, counting the samples a shard lacks against its
    sizes.json: a tar cut short (even inside a header) raises at most once or not at all, and
    every sample after the cut would be lost without a count."""
    sizes, warned = {}, set()
    for shard in src:
        n = 0
        for sample in wds.tarfile_to_samples(handler=stats.handler)(iter([shard])):
            n += 1
            yield sample
        expected = shard_size(shard["url"], sizes)
        if expected is not None and n < expected and stats.shard_errors():
            stats.pending["lost_samples"] += expected - n  # counted each read; logged once a shard
            if shard["url"] not in warned:
                warned.add(shard["url"])
                log.warning("shard %s: %d of the %d samples sizes.json lists were read", shard["url"], n, expected)


def _attach_stats(src, stats: SkipCounter):
    """Carry skip counts to the main process in the batches; a counts-only item at the end."""
    for batch in src:
        batch["skipped"] = stats.take()
        yield batch
    if stats.pending:
        yield {"skipped": stats.take()}


# ---------------------------------------------------------------- decode and prepare


def decode_member(key: str, data: bytes):
    """Decoder handler: images to PIL (any mode; converted later), json to dict."""
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTS:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode here, so truncated bytes fail in this stage
        return img
    if ext == "json":
        return json.loads(data)
    return None


class Prepare:
    """Decoded sample -> tokenised, label-masked, preprocessed sample (or BadSample)."""

    def __init__(
        self,
        tokenizer,
        image_processor,
        *,
        image_token_id,
        num_image_tokens,
        max_length,
        overlong="truncate",
        generation=False,
        stats: SkipCounter | None = None,
    ):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.kw = dict(
            image_token_id=image_token_id,
            num_image_tokens=num_image_tokens,
            max_length=max_length,
            overlong="drop" if generation else overlong,
        )
        self.generation, self.stats = generation, stats or SkipCounter()

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__")
        try:
            out = self._prepare(sample, key)
            if "__chunk__" in sample:  # exact mode: the micro-batch it belongs to
                out["__chunk__"] = sample["__chunk__"]
            self.stats.good()
            return out
        except BadSample:
            raise
        except Exception as exn:  # anything unforeseen still skips only this sample
            raise BadSample("error", key, repr(exn)[:200]) from exn

    def _prepare(self, sample, key):
        meta = sample.get("json")
        if not isinstance(meta, dict):
            raise BadSample("malformed_json", key, "no json member" if meta is None else "json is not an object")
        image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        conversations = meta.get("conversations")
        wants_image = bool(meta.get("image")) or IMAGE_MARKER in json.dumps(conversations)
        if image is None and wants_image:
            raise BadSample("missing_image", key, f"no image member (json image: {meta.get('image')!r})")
        turns, reference = parse_conversation(
            conversations, has_image=image is not None, key=key, generation=self.generation
        )
        enc = encode(turns, self.tokenizer, key=key, **self.kw)
        if enc["truncated"]:
            self.stats.count("truncated")
        pixel_values = None
        if image is not None:
            if image.mode != "RGB":
                self.stats.count("converted_image")
            pixel_values = preprocess_image(image, self.image_processor)
        info = {k: meta[k] for k in ("id", "family", "qtype", "answer") if k in meta}
        return dict(
            __key__=key,
            input_ids=enc["input_ids"],
            labels=enc["labels"],
            query_mask=enc["query_mask"],
            image_start=enc["image_start"],
            pixel_values=pixel_values,
            meta=info,
            reference=reference,
        )


def collate(samples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad to the batch's longest; attention_mask 1 on real tokens."""
    B, L = len(samples), max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    query_mask = torch.zeros((B, L), dtype=torch.bool)
    image_start = torch.full((B,), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        at = slice(L - n, L) if padding_side == "left" else slice(0, n)
        input_ids[i, at] = torch.tensor(s["input_ids"])
        attention_mask[i, at] = 1
        labels[i, at] = torch.tensor(s["labels"])
        query_mask[i, at] = torch.tensor(s["query_mask"], dtype=torch.bool)
        if s["image_start"] >= 0:
            image_start[i] = s["image_start"] + at.start
    images = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        query_mask=query_mask,
        image_start=image_start,
        has_image=image_start >= 0,
        pixel_values=torch.stack(images) if images else None,
        keys=[s["__key__"] for s in samples],
        meta=[s["meta"] for s in samples],
        answers=[s["reference"] for s in samples],
    )


# ---------------------------------------------------------------- loader


class Loader:
    """Iterable of batches over a `wds.WebLoader`; `stats` accumulates skip counts by kind.

    `num_batches`: batches per epoch on this rank (resampled mode), None in exact mode.
    """

    def __init__(self, webloader: wds.WebLoader, num_batches: int | None):
        self.webloader, self.num_batches = webloader, num_batches
        self.stats = Counter()

    def __iter__(self):
        n = 0
        if self.num_batches is not None and self.num_batches <= 0:
            return
        for batch in self.webloader:
            self.stats.update(batch.pop("skipped", {}))
            if "input_ids" not in batch:  # counts-only item from the end of a worker's stream
                continue
            yield batch
            n += 1
            if self.num_batches is not None and n >= self.num_batches:
                return


def build_pipeline(
    cfg: DataConfig,
    tokenizer,
    image_processor,
    *,
    image_token_id: int,
    num_image_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start: int = 0,
    generation: bool = False,
) -> wds.DataPipeline:
    """`start`: exact mode, the epoch's global sample position to begin at (a resume)."""
    urls = list_shards(cfg.shards)
    if cfg.max_consecutive_bad < 1:
        raise ValueError(f"config error at 'data.max_consecutive_bad': must be >= 1, got {cfg.max_consecutive_bad}")
    if start and cfg.resampled:
        raise ValueError("a start position is for exact mode (data.resampled=false)")
    exact = not cfg.resampled
    stats = SkipCounter(limit=cfg.max_consecutive_bad, shard_errors=lambda: not exact or rank == _worker_id() == 0)
    if cfg.resampled:
        source = [
            wds.ResampledShards(
                urls, seed=make_seed(cfg.seed, epoch), deterministic=True, worker_seed=partial(_worker_seed, rank)
            )
        ]
    else:
        source = [wds.SimpleShardList(urls, seed=make_seed(cfg.seed, epoch))]  # the same order in every reader
    prepare = Prepare(
        tokenizer,
        image_processor,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        max_length=cfg.max_length,
        overlong=cfg.overlong,
        generation=generation,
        stats=stats,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collation_fn = partial(collate, pad_token_id=pad_id, padding_side="left" if generation else "right")
    return wds.DataPipeline(
        *source,
        partial(_read_shards, stats=stats),
        partial(_shuffle, bufsize=cfg.shuffle_buffer, seed=cfg.seed, epoch=epoch, rank=None if exact else rank)
        if cfg.shuffle_buffer > 1
        else None,
        partial(_own_positions, start=start, batch_size=cfg.batch_size, rank=rank, world_size=world_size)
        if exact
        else None,
        wds.decode(decode_member, handler=stats.handler),
        wds.map(prepare, handler=stats.handler),
        partial(_batch_chunks, collation_fn=collation_fn, world_size=world_size)
        if exact
        else wds.batched(cfg.batch_size, partial=True, collation_fn=collation_fn),
        partial(_attach_stats, stats=stats),
    )


def build_loader(cfg: DataConfig, tokenizer, image_processor, drop_last: bool = False, **kw) -> Loader:
    """Batches for one rank (`kw`: build_pipeline's keywords). Resampled: exactly `num_batches`
    per epoch on every rank; exact with `drop_last`: the same, the epoch's last partial
    global micro-batch round dropped (N from sizes.json)."""
    pipeline = build_pipeline(cfg, tokenizer, image_processor, **kw)
    webloader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=cfg.num_workers,
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers else None,
    )
    num_batches = None
    if cfg.resampled:
        total = cfg.epoch_samples or dataset_size(list_shards(cfg.shards))
        if not total:
            raise ValueError("resampled mode needs epoch_samples or a sizes.json beside the shards")
        num_batches = max(1, total // (kw.get("world_size", 1) * cfg.batch_size))
    elif drop_last:
        total = dataset_size(list_shards(cfg.shards))
        if not total:
            raise ValueError("exact mode with drop_last needs a sizes.json beside the shards")
        num_batches = (total - kw.get("start", 0)) // (kw.get("world_size", 1) * cfg.batch_size)
    return Loader(webloader, num_batches)


def build_prompt_batch(
    samples: list[dict],
    tokenizer,
    image_processor,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int = 4096,
    padding_side: str = "left",
) -> dict:
    """Generation prompts from samples as the shards hold them ({__key__, json, png|jpg}, raw
    bytes or decoded): the conversation up to the last "ASSISTANT:", the last answer cut off
    and returned in `answers`. Raises BadSample for a bad sample (no skipping here)."""
    prepare = Prepare(
        tokenizer,
        image_processor,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
        max_length=max_length,
        generation=True,
    )
    decoded = [
        {k: decode_member("." + k, v) or v if isinstance(v, bytes) else v for k, v in s.items()} for s in samples
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate([prepare(s) for s in decoded], pad_id, padding_side)


# ---------------------------------------------------------------- benchmark


def bench(argv=None):
    """python -m pipeline.data.loader bench --shards DIR [--workers 0,1,2] [--batches 30] ...

    Loader throughput (decode + preprocess + tokenise + collate), samples/s per worker count,
    with the embedded default's word tokenizer and a CLIP processor of --image-size."""
    from transformers import CLIPImageProcessor

    from pipeline.data.tokenizer import build_word_tokenizer

    p = argparse.ArgumentParser(prog="python -m pipeline.data.loader bench")
    p.add_argument("--shards", required=True)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3, help="batches not timed (worker start-up)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--num-image-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=512)
    a = p.parse_args(argv)
    tok = build_word_tokenizer()
    proc = CLIPImageProcessor(
        size={"shortest_edge": a.image_size}, crop_size={"height": a.image_size, "width": a.image_size}
    )
    image_token_id = tok.convert_tokens_to_ids(IMAGE_MARKER)
    for w in (int(x) for x in a.workers.split(",")):
        cfg = DataConfig(
            shards=a.shards,
            batch_size=a.batch_size,
            num_workers=w,
            resampled=True,
            epoch_samples=(a.batches + a.warmup) * a.batch_size,
            max_length=a.max_length,
        )
        loader = build_loader(cfg, tok, proc, image_token_id=image_token_id, num_image_tokens=a.num_image_tokens)
        n, t0 = 0, None
        for i, batch in enumerate(loader):
            if i == a.warmup:
                t0 = time.perf_counter()
            if i >= a.warmup:
                n += len(batch["keys"])
        dt = time.perf_counter() - t0
        print(
            f"workers={w} batch={a.batch_size}: {n / dt:.1f} samples/s ({n} samples in {dt:.2f} s)"
            f" skipped={dict(loader.stats)}",
            flush=True,
        )


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "bench":
        sys.exit("usage: python -m pipeline.data.loader bench --shards DIR [--workers 0,1,2] [--batches N]")
    logging.basicConfig(level=logging.WARNING)
    bench(sys.argv[2:])
