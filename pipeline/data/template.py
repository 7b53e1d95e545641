"""LLaVA-1.5's conversation template (`vicuna_v1`), label masking and image preprocessing.

Rendered text (LLaVA-1.5, `conv_templates["vicuna_v1"]`, sep_style TWO):

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

- `<image>` is moved to the front of its turn followed by a newline (LLaVA's
  `preprocess_multimodal`), then replaced by `num_image_tokens` copies of the model's image
  token id. The text is tokenised in chunks around it, as LLaVA's `tokenizer_image_token`.
- labels: -100 everywhere but the assistant answers and their `</s>` (LLaVA's masking).
- query_mask: the tokens of the first user instruction after the image (the image turn's
  text without the marker); METHOD.md sec. 1's S_cross reads it. All False without image.
- Token <-> text alignment uses the fast tokenizer's offset mapping, so any HF fast tokenizer
  works (Llama/Vicuna's included); nothing here knows about the word-level tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"
IMAGE_MARKER = "<image>"
IGNORE_INDEX = -100


class BadSample(Exception):
    """A sample the pipeline skips; `kind` is the counter it lands in."""

    def __init__(self, kind: str, key: str | None, detail: str = ""):
        super().__init__(f"{kind} [{key}] {detail}")
        self.kind, self.key, self.detail = kind, key, detail


@dataclass
class Turn:
    user: str  # marker removed
    answer: str | None  # None: a generation prompt ends here
    has_image: bool = False


def parse_conversation(conversations, *, has_image: bool, key: str | None, generation: bool = False):
    """Validate LLaVA's `[{from: human|gpt, value}]` list; return (turns, reference answer).

    Training needs alternating human/gpt turns ending with an answer. For a generation prompt
    the last answer (if any) is cut off and returned as the reference.
    """
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("malformed_json", key, "no conversations list")
    for i, t in enumerate(conversations):
        if not (isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") in ("human", "gpt")):
            raise BadSample("malformed_json", key, f"turn {i} is not {{from: human|gpt, value: str}}")
        if t["from"] != ("human", "gpt")[i % 2]:
            raise BadSample("bad_conversation", key, f"turn {i} from {t['from']}: roles must alternate human, gpt")
        if not t["value"].replace(IMAGE_MARKER, "").strip():
            raise BadSample("empty_turn", key, f"turn {i} is empty")
    markers = [t["value"].count(IMAGE_MARKER) for t in conversations]
    if has_image and sum(markers) == 0:
        raise BadSample("no_image_marker", key, "image present but no <image> in the text")
    if sum(markers) > 1:
        raise BadSample("extra_image_marker", key, f"{sum(markers)} <image> markers")
    if not has_image and sum(markers):
        raise BadSample("missing_image", key, "<image> in the text but no image in the sample")
    if sum(markers) and markers.index(1) % 2:
        raise BadSample("bad_conversation", key, "<image> in an assistant turn")

    reference = None
    if generation and len(conversations) % 2 == 0:
        reference = conversations[-1]["value"].strip()
        conversations = conversations[:-1]
    elif not generation and len(conversations) % 2:
        raise BadSample("bad_conversation", key, "last turn has no answer")
    turns = []
    for i in range(0, len(conversations), 2):
        user = conversations[i]["value"]
        answer = conversations[i + 1]["value"].strip() if i + 1 < len(conversations) else None
        turns.append(Turn(user.replace(IMAGE_MARKER, "").strip(), answer, IMAGE_MARKER in user))
    return turns, reference


def _pieces(turns: list[Turn]):
    """The rendered conversation as (text, tag) pieces; tag: None, 'query', 'answer' or 'image'."""
    pieces = [(SYSTEM_PROMPT + SEP, None)]
    query_done = False
    for t in turns:
        pieces.append((ROLES[0] + ": ", None))
        if t.has_image:
            pieces += [("", "image"), ("\n", None), (t.user, "query")]
            query_done = True
        else:
            pieces.append((t.user, None))
        if t.answer is None:
            pieces.append((SEP + ROLES[1] + ":", None))
        else:
            pieces += [(SEP + ROLES[1] + ": ", None), (t.answer + SEP2, "answer")]
    assert query_done or not any(t.has_image for t in turns)
    return pieces


def render(turns: list[Turn]) -> str:
    """The conversation as LLaVA's `conv.get_prompt()` writes it (with the literal `<image>`)."""
    return "".join(IMAGE_MARKER if tag == "image" else text for text, tag in _pieces(turns))


def encode(
    turns,
    tokenizer,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    overlong: str = "truncate",
    key: str | None = None,
):
    """Tokenise a parsed conversation. Returns dict(input_ids, labels, query_mask: lists,
    image_start: index of the first image token or -1, truncated: bool).

    Over-long: `truncate` cuts the tail but never inside the image tokens (then the sample is
    dropped, as with `drop`); a cut that leaves no answer token also drops it.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("the template needs a fast tokenizer (offset mapping)")
    # Split the pieces into text chunks around the image; keep each tagged piece's char span.
    chunks, spans = [""], [[]]
    for text, tag in _pieces(turns):
        if tag == "image":
            chunks.append("")
            spans.append([])
            continue
        if tag:
            spans[-1].append((len(chunks[-1]), len(chunks[-1]) + len(text), tag))
        chunks[-1] += text
    enc = tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True)

    ids, labels, query = [], [], []
    if tokenizer.bos_token_id is not None:
        ids, labels, query = [tokenizer.bos_token_id], [IGNORE_INDEX], [False]
    image_start = -1
    for c, (chunk_ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
        if c > 0:  # the image sits between chunk c-1 and chunk c
            image_start = len(ids)
            ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            query += [False] * num_image_tokens
        for tok, (s, e) in zip(chunk_ids, offsets):
            # a token belongs to a span if it overlaps it (Llama's "▁word" starts on the space)
            tags = {tag for a, b, tag in spans[c] if e > s and s < b and e > a}
            ids.append(tok)
            labels.append(tok if "answer" in tags else IGNORE_INDEX)
            query.append("query" in tags)

    truncated = False
    if len(ids) > max_length:
        image_end = image_start + num_image_tokens if image_start >= 0 else 0
        if overlong != "truncate" or image_end > max_length:
            raise BadSample("too_long", key, f"{len(ids)} tokens > max_length {max_length}")
        ids, labels, query = ids[:max_length], labels[:max_length], query[:max_length]
        truncated = True
        if all(lab == IGNORE_INDEX for lab in labels) and any(t.answer for t in turns):
            raise BadSample("too_long", key, "truncation leaves no answer token")
    return dict(input_ids=ids, labels=labels, query_mask=query, image_start=image_start, truncated=truncated)


# ---------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """RGBA / LA / P-with-transparency are composited on white; L, CMYK, I, ... converted."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def expand2square(img: Image.Image, fill) -> Image.Image:
    """LLaVA's `image_aspect_ratio: pad`: centre the image on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def preprocess_image(img: Image.Image, image_processor) -> torch.Tensor:
    """[3, H, W] float: pad to square with the processor's mean colour, then CLIP preprocess."""
    fill = tuple(int(x * 255) for x in image_processor.image_mean)
    img = expand2square(to_rgb(img), fill)
    return image_processor(images=img, return_tensors="pt")["pixel_values"][0]
