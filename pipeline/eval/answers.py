"""Answers from a model, and how they are scored: one module for every evaluator.

The project's eval stage (`python -m pipeline stage eval`) and the lmms-eval plugin
(`pipeline/eval/lmms/`) both call these, so the same samples get the same scores in both.

- `normalize_answer` / `is_correct`: exact match after normalising (strip, first line,
  lower case, trailing punctuation dropped).
- `prompt_for(question)`: LLaVA-1.5's vicuna_v1 prompt for one image question, ending in
  "ASSISTANT:" (pipeline/data/template.py renders it).
- `encode_prompt`: a rendered prompt -> token ids exactly as the training template tokenises
  it (text chunks around `<image>` tokenised separately, `<s>` first, `<image>` expanded to
  the model's Lv image tokens), so prompts match what the model was trained on.
- `greedy_answers`: batched greedy decoding, left padding, only the new tokens decoded.
- `choice_loglikelihoods`: log P(continuation | prompt) and whether it is the greedy
  continuation, batched; the pruning is decided from the prompt alone (see there).
- `TokenStats`: visual tokens per decoder layer seen by the model (`out.visual_tokens`,
  docs/METHOD.md sec 7), averaged over the image samples: N_bar and the per-layer profile.

`processor` is a LlavaProcessor (what `AutoProcessor.from_pretrained(export_dir)` returns)
or a `(tokenizer, image_processor)` pair. Images are PIL images (None: a text-only prompt)
and are padded to a square with the mean colour, then CLIP-preprocessed (LLaVA-1.5's
`image_aspect_ratio: pad`, `pipeline.data.template.preprocess_image`).
"""

from __future__ import annotations

import re
import string

import torch

from pipeline.data.template import IMAGE_MARKER, Turn, preprocess_image, render

_TRAILING = string.punctuation + " \t"


# ------------------------------------------------------------------ scoring


def normalize_answer(text) -> str:
    """First non-empty line, stripped, lower case, trailing punctuation removed."""
    text = "" if text is None else str(text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return re.sub(r"\s+", " ", first.strip().lower()).rstrip(_TRAILING)


def is_correct(pred, gold) -> bool:
    """Exact match after `normalize_answer` on both sides."""
    return normalize_answer(pred) == normalize_answer(gold)


# ------------------------------------------------------------------ prompts


def prompt_for(question: str, image: bool = True) -> str:
    """LLaVA-1.5's (vicuna_v1) prompt for one question: system line, `USER: <image>\\n{q}
    ASSISTANT:` (the `<image>` marker only when `image`)."""
    return render([Turn(question.replace(IMAGE_MARKER, "").strip(), None, image)])


def split_processor(processor):
    """(tokenizer, image_processor) from a LlavaProcessor or a pair."""
    if isinstance(processor, (tuple, list)):
        tokenizer, image_processor = processor
        return tokenizer, image_processor
    return processor.tokenizer, processor.image_processor


def encode_prompt(prompt: str, tokenizer, *, image_token_id: int, num_image_tokens: int) -> list[int]:
    """Token ids of a rendered prompt, tokenised as `pipeline.data.template.encode` does: the text
    chunks around the `<image>` marker separately, `<s>` first, the marker expanded to
    `num_image_tokens` image tokens."""
    chunks = prompt.split(IMAGE_MARKER)
    if len(chunks) > 2:
        raise ValueError(f"prompt holds {len(chunks) - 1} {IMAGE_MARKER} markers; one image per prompt")
    enc = tokenizer(chunks, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for c, chunk_ids in enumerate(enc):
        if c > 0:
            ids += [image_token_id] * num_image_tokens
        ids += chunk_ids
    return ids


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def model_inputs(model, tokenizer, image_processor, rows: list[list[int]], images: list, query_ends=None):
    """Left-padded input_ids / attention_mask, pixel_values for the rows with an image, and
    (with `query_ends`) a query_mask: the text after the image up to query_ends[i] (exclusive,
    index in the unpadded row)."""
    cfg = model.config
    B, L = len(rows), max(map(len, rows))
    input_ids = torch.full((B, L), _pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    query_mask = torch.zeros((B, L), dtype=torch.bool) if query_ends is not None else None
    pixels = []
    for i, (row, img) in enumerate(zip(rows, images)):
        off = L - len(row)
        input_ids[i, off:] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, off:] = 1
        has_image = cfg.image_token_id in row
        if has_image != (img is not None):
            raise ValueError(
                f"prompt {i}: {'an' if has_image else 'no'} image marker but {'no' if img is None else 'an'} image"
            )
        if img is not None:
            pixels.append(preprocess_image(img, image_processor))
        if query_mask is not None and has_image:
            last_img = len(row) - 1 - row[::-1].index(cfg.image_token_id)
            query_mask[i, off + last_img + 1 : off + query_ends[i]] = True
    dev = model.device
    out = dict(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev))
    if pixels:
        out["pixel_values"] = torch.stack(pixels).to(dev, model.dtype)
    if query_mask is not None:
        out["query_mask"] = query_mask.to(dev)
    return out


def _batches(lengths: list[int], batch_size: int):
    """Index batches, longest prompts first (less padding; the caller's order is restored)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for s in range(0, len(order), max(1, batch_size)):
        yield order[s : s + batch_size]


class _Capture:
    """Forward hook keeping the prefill's `visual_tokens` (decode steps return None) and, in
    `info`, what `pipeline.eval.diagnostics` reads of it (keep masks, ATP's branches)."""

    def __init__(self, model):
        self.value = self.info = None
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        vt = getattr(output, "visual_tokens", None)
        if vt is not None and self.value is None:
            self.info = prefill_info(output)
            self.value = self.info["visual_tokens"]

    def close(self):
        self.handle.remove()


def prefill_info(output) -> dict:
    """What `Diagnostics.add` reads from a prefill's output, per batch row (CPU tensors)."""
    info = output.atp_info or {}
    return {
        "visual_tokens": output.visual_tokens.detach().float().cpu(),
        "keep": None if "keep" not in info else (info["keep"] > 0.5).cpu(),
        "branch": None if "branch" not in info else info["branch"].cpu(),
    }


def batch_row(info: dict, j: int) -> dict:
    """Row j of a batch's `prefill_info`."""
    return {k: None if v is None else v[j] for k, v in info.items()}


class TokenStats:
    """Visual tokens per decoder layer, summed over the image samples the model saw."""

    def __init__(self):
        self.samples = 0
        self.text_only = 0
        self.per_layer: torch.Tensor | None = None

    def add(self, visual_tokens: torch.Tensor | None, has_image) -> None:
        """visual_tokens: [B, num_layers] (`out.visual_tokens`); has_image: [B] bools."""
        has_image = torch.as_tensor(has_image, dtype=torch.bool)
        self.text_only += int((~has_image).sum())
        if visual_tokens is None or not bool(has_image.any()):
            return
        vt = visual_tokens.detach().float().cpu()[has_image]
        self.samples += vt.shape[0]
        total = vt.sum(0).double()
        self.per_layer = total if self.per_layer is None else self.per_layer + total

    def merge(self, other: TokenStats) -> None:
        """Add another collection's samples (e.g. per-family stats into an overall one)."""
        self.samples += other.samples
        self.text_only += other.text_only
        if other.per_layer is not None:
            self.per_layer = other.per_layer.clone() if self.per_layer is None else self.per_layer + other.per_layer

    def summary(self) -> dict:
        """{image_samples, text_only_samples, n_bar, tokens_per_layer}; N_bar = the mean over
        layers of the per-layer average (METHOD sec 7). None without image samples."""
        if not self.samples:
            return dict(image_samples=0, text_only_samples=self.text_only, n_bar=None, tokens_per_layer=None)
        per_layer = (self.per_layer / self.samples).tolist()
        return dict(
            image_samples=self.samples,
            text_only_samples=self.text_only,
            n_bar=sum(per_layer) / len(per_layer),
            tokens_per_layer=per_layer,
        )


# ------------------------------------------------------------------ generation


@torch.no_grad()
def greedy_answers(
    model,
    processor,
    prompts: list[str],
    images: list,
    max_new_tokens: int = 8,
    batch_size: int = 8,
    stats: TokenStats | None = None,
    prefill: dict | None = None,
) -> list[str]:
    """Greedy answers to rendered prompts (`prompt_for`, or any prompt holding at most one
    `<image>`), batched, left-padded; only the new tokens are decoded (special tokens
    skipped). In eval mode the model prunes for real; `stats` collects the tokens it kept, and
    `prefill` (a dict) gets each prompt's prefill record (a `prefill_info` row) by index."""
    if model.training:
        raise RuntimeError("call model.eval() first: eval mode is what prunes for real")
    tokenizer, image_processor = split_processor(processor)
    cfg = model.config
    rows = [
        encode_prompt(p, tokenizer, image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_visual_tokens)
        for p in prompts
    ]
    out: list[str | None] = [None] * len(rows)
    for idx in _batches([len(r) for r in rows], batch_size):
        inputs = model_inputs(model, tokenizer, image_processor, [rows[i] for i in idx], [images[i] for i in idx])
        capture = _Capture(model)
        try:
            gen = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=_pad_id(tokenizer),
                eos_token_id=tokenizer.eos_token_id,
            )
        finally:
            capture.close()
        if stats is not None:
            stats.add(capture.value, [images[i] is not None for i in idx])
        if prefill is not None:
            prefill.update({i: batch_row(capture.info, j) for j, i in enumerate(idx)})
        new = gen[:, inputs["input_ids"].shape[1] :]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


# ------------------------------------------------------------------ likelihoods


def encode_continuation(
    prompt: str, continuation: str, tokenizer, *, image_token_id: int, num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, continuation ids): the continuation's tokens are those of `prompt +
    continuation` past the prompt's when the prompt's ids are a prefix (the usual case),
    else the continuation tokenised on its own."""
    kw = dict(image_token_id=image_token_id, num_image_tokens=num_image_tokens)
    ctx = encode_prompt(prompt, tokenizer, **kw)
    whole = encode_prompt(prompt + continuation, tokenizer, **kw)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def choice_loglikelihoods(
    model,
    processor,
    prompts: list[str],
    images: list,
    continuations: list[str],
    batch_size: int = 8,
    stats: TokenStats | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log P(continuation tokens | prompt), whether every continuation token is the
    argmax) for each (prompt, image, continuation), batched, left-padded, with hard pruning.

    The pruning sees the prompt only: `query_mask` (METHOD sec 1's S_cross) is the text after
    the image up to the end of the prompt, as in generation; left to the model's default it
    would include the continuation, letting each candidate answer steer which visual tokens
    are kept. Under causal attention the continuation cannot change the scores otherwise, so
    every candidate of a question is scored against the same pruned image.
    """
    if model.training:
        raise RuntimeError("call model.eval() first: eval mode is what prunes for real")
    tokenizer, image_processor = split_processor(processor)
    cfg = model.config
    pairs = [
        encode_continuation(p, c, tokenizer, image_token_id=cfg.image_token_id, num_image_tokens=cfg.num_visual_tokens)
        for p, c in zip(prompts, continuations)
    ]
    for i, (_, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"continuation {i} ({continuations[i]!r}) has no tokens")
    rows = [ctx + cont for ctx, cont in pairs]
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    for idx in _batches([len(r) for r in rows], batch_size):
        batch_rows = [rows[i] for i in idx]
        inputs = model_inputs(
            model,
            tokenizer,
            image_processor,
            batch_rows,
            [images[i] for i in idx],
            query_ends=[len(pairs[i][0]) for i in idx],
        )
        res = model(**inputs, use_cache=False)
        if stats is not None:
            stats.add(res.visual_tokens, [images[i] is not None for i in idx])
        logprobs = torch.log_softmax(res.logits.float(), dim=-1)
        L = inputs["input_ids"].shape[1]
        for b, i in enumerate(idx):
            n_cont = len(pairs[i][1])
            # the logits at position t predict token t + 1; the continuation is the last n_cont tokens
            pred = logprobs[b, L - n_cont - 1 : L - 1]
            target = inputs["input_ids"][b, L - n_cont :]
            ll = pred.gather(-1, target[:, None]).sum().item()
            greedy = bool((pred.argmax(-1) == target).all())
            out[i] = (ll, greedy)
    return out
