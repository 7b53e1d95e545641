"""Synthetic visual-question benchmark: coloured shapes on a background, written as shards.

    python -m shards.synthetic --out DIR --split train|eval --samples N --seed S [options]

Each image: a background colour, one BIG shape (35-50% of the side) and 1-5 SMALL shapes
(~11% of the side, each inside one cell of a 2x2 grid). Coarse questions ask about the
background and the big shape (a handful of visual tokens answer them); fine questions ask
about the small shapes (counting, the colour in a named cell: each small shape covers only
about 4 of 256 patches, so they need many tokens). Design and reasoning: shards/README.md.

Deterministic: same arguments, same bytes (fixed tar mtime/owner, PNG, per-sample seeds);
the split name enters every seed, so train and eval never share a random stream.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS = {  # shape colours: far apart in RGB, jittered per shape
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 20),
}
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25), "brown": (115, 75, 45)}
KINDS = ("circle", "square", "triangle")
CELLS = {
    2: ["top left", "top right", "bottom left", "bottom right"],
    3: [
        "top left",
        "top middle",
        "top right",
        "middle left",
        "center",
        "middle right",
        "bottom left",
        "bottom middle",
        "bottom right",
    ],
}

FAMILIES = {
    "coarse": ["background", "big_color", "big_is_color", "big_kind", "has_color"],
    "fine": ["count_total", "count_color", "count_kind", "cell_color", "cell_kind"],
}
# The default set: what a tiny base trained on 2 CPU cores learns well (shards/README.md).
# Comparisons with a word of the question (big_is_color, count_color) stayed near their
# answer prior after two training rounds, so they are opt-in (--qtypes), not the benchmark.
DEFAULT_QTYPES = ["background", "big_color", "count_total", "cell_color"]
QUESTIONS = {
    "background": "what color is the background?",
    "big_color": "what color is the big shape?",
    "big_is_color": "is the big shape {color}?",
    "big_kind": "what kind of shape is the big shape?",
    "has_color": "is there a {color} shape?",
    "count_total": "how many small shapes are there?",
    "count_color": "how many small {color} shapes are there?",
    "count_kind": "how many small {kind}s are there?",
    "cell_color": "what color is the small shape in the {cell}?",
    "cell_kind": "what kind of shape is the small shape in the {cell}?",
}
FAMILY_OF = {q: f for f, qs in FAMILIES.items() for q in qs}
SPLIT_CODE = {"train": 1, "eval": 2}
TAR_MTIME = 946684800  # 2000-01-01: fixed so that the same seed gives the same tar bytes


def vocabulary(max_shapes: int = 9) -> list[str]:
    """Every word the benchmark writes (questions and answers), lower case, in a fixed order."""
    texts = [
        q.format(color=c, kind=k, cell=cell)
        for q in QUESTIONS.values()
        for c in COLORS
        for k in KINDS
        for cell in CELLS[3]
    ]
    texts += [*COLORS, *BACKGROUNDS, *KINDS, "yes", "no", *map(str, range(max_shapes + 1))]
    seen = {}
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]+", t.lower()):
            seen.setdefault(w, None)
    return list(seen)


@dataclass
class Options:
    image_size: int = 128
    min_shapes: int = 1
    max_shapes: int = 5
    grid: int = 2
    turns: int = 4
    fine_share: float = 0.5
    qtypes: tuple = tuple(DEFAULT_QTYPES)
    noise: float = 0.0  # per-pixel noise std; colour jitter per shape already varies colours
    # words of context before the first question: long sequences (LLaVA-1.5's 2048) for shape
    # and throughput runs; drawn from the benchmark's own words, so the word tokenizer knows them
    context_words: int = 0


# ---------------------------------------------------------------- scene


def _jitter(rng, rgb, amount=15):
    return tuple(int(np.clip(v + rng.randint(-amount, amount), 0, 255)) for v in rgb)


def _overlaps(a, b, gap):
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(rng: random.Random, opt: Options, n_small: int, need_cell: bool):
    """Background, one big shape, `n_small` small shapes each wholly inside one grid cell.

    With `need_cell` and 2+ small shapes, some cell holds exactly one small shape and another
    small shape has a different colour (so "the colour of any small shape" is no shortcut).
    """
    S, g = opt.image_size, opt.grid
    cell_px = S / g
    for _ in range(1000):
        big_side = rng.randint(int(0.35 * S), int(0.5 * S))
        x0, y0 = rng.randint(0, S - big_side), rng.randint(0, S - big_side)
        big = dict(kind=rng.choice(KINDS), color=rng.choice(list(COLORS)), box=[x0, y0, x0 + big_side, y0 + big_side])
        n_colors = rng.randint(1, min(n_small, 2))
        palette = rng.sample(list(COLORS), n_colors)
        colors = palette + [rng.choice(palette) for _ in range(n_small - n_colors)]
        rng.shuffle(colors)
        small, ok = [], True
        for color in colors:
            for _ in range(200):
                side = rng.randint(max(6, round(0.09 * S)), max(8, round(0.125 * S)))
                cell = rng.randrange(g * g)
                cx0, cy0 = int((cell % g) * cell_px), int((cell // g) * cell_px)
                if cell_px - side - 4 < 2:
                    continue
                x = cx0 + 2 + rng.randint(0, int(cell_px) - side - 4)
                y = cy0 + 2 + rng.randint(0, int(cell_px) - side - 4)
                box = [x, y, x + side, y + side]
                if _overlaps(box, big["box"], 3) or any(_overlaps(box, s["box"], 3) for s in small):
                    continue
                small.append(dict(kind=rng.choice(KINDS), color=color, box=box, cell=cell))
                break
            else:
                ok = False
                break
        if not ok:
            continue
        if need_cell and n_small > 1 and not _cell_candidates(small, g):
            continue
        return dict(background=rng.choice(list(BACKGROUNDS)), big=big, small=small)
    raise RuntimeError("could not place the shapes: image too small for the options")


def _cell_candidates(small, g):
    """Cells holding exactly one small shape whose colour differs from some other small shape."""
    out = []
    for cell in range(g * g):
        inside = [s for s in small if s["cell"] == cell]
        if len(inside) == 1 and any(s["color"] != inside[0]["color"] for s in small):
            out.append(cell)
    return out


def _draw_shape(draw, kind, box, fill):
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)


def render_scene(scene, opt: Options, rng: random.Random, np_rng: np.random.Generator) -> bytes:
    S = opt.image_size
    img = Image.new("RGB", (S, S), _jitter(rng, BACKGROUNDS[scene["background"]], 8))
    draw = ImageDraw.Draw(img)
    for s in [scene["big"], *scene["small"]]:
        _draw_shape(draw, s["kind"], s["box"], _jitter(rng, COLORS[s["color"]]))
    if opt.noise:
        arr = np.asarray(img, dtype=np.float32) + np_rng.normal(0, opt.noise, (S, S, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless and byte-deterministic
    return buf.getvalue()


# ---------------------------------------------------------------- questions


class Planner:
    """Exact family shares over the split, spread evenly over the images; qtypes drawn from
    per-family decks (balanced to within one deck); yes/no answers alternate per qtype
    (balanced by construction)."""

    def __init__(self, rng: random.Random, opt: Options, n_samples: int):
        self.rng, self.opt = rng, opt
        self.by_family = {f: [q for q in opt.qtypes if FAMILY_OF[q] == f] for f in FAMILIES}
        total = n_samples * opt.turns
        n_fine = round(total * opt.fine_share) if self.by_family["fine"] else 0
        if not self.by_family["coarse"]:
            n_fine = total
        # every image gets floor or ceil of turns x share fine questions: a global shuffle gave
        # some images 3-4 of one family, more than its distinct questions (repeats in the text)
        per_image, extra = divmod(n_fine, n_samples)
        plus_one = set(rng.sample(range(n_samples), extra))
        self.families = []
        for i in range(n_samples):
            k = per_image + (i in plus_one)
            self.families += rng.sample(["fine"] * k + ["coarse"] * (opt.turns - k), opt.turns)
        self.decks = {f: [] for f in FAMILIES}
        self.yes_next = {}

    def qtypes_for(self, index: int) -> list[str]:
        fams = self.families[index * self.opt.turns : (index + 1) * self.opt.turns]
        chosen = []
        for fam in fams:
            deck = self.decks[fam]
            for _ in range(2 * len(self.by_family[fam]) + 1):
                if not deck:
                    deck.extend(self.rng.sample(self.by_family[fam], len(self.by_family[fam])))
                q = deck.pop()
                if q not in chosen or "{" in QUESTIONS[q]:  # no identical question twice per image
                    break
                deck.insert(0, q)
            chosen.append(q)
        return chosen

    def yes(self, qtype: str) -> bool:
        self.yes_next[qtype] = not self.yes_next.get(qtype, True)
        return self.yes_next[qtype]


def ask(qtype: str, scene, rng: random.Random, planner: Planner, asked: set, g: int):
    """(question, answer) for one qtype; parameters avoid repeating a question in the sample."""
    big, small = scene["big"], scene["small"]
    q = QUESTIONS[qtype]
    for _ in range(20):
        if qtype == "background":
            out = q, scene["background"]
        elif qtype == "big_color":
            out = q, big["color"]
        elif qtype == "big_kind":
            out = q, big["kind"]
        elif qtype == "big_is_color":
            yes = planner.yes(qtype)
            c = big["color"] if yes else rng.choice([c for c in COLORS if c != big["color"]])
            out = q.format(color=c), "yes" if yes else "no"
        elif qtype == "has_color":
            present = {big["color"], *(s["color"] for s in small)}
            absent = [c for c in COLORS if c not in present]
            yes = planner.yes(qtype) or not absent
            c = rng.choice(sorted(present) if yes else absent)
            out = q.format(color=c), "yes" if yes else "no"
        elif qtype == "count_total":
            out = q, str(len(small))
        elif qtype in ("count_color", "count_kind"):
            field, values = ("color", list(COLORS)) if qtype == "count_color" else ("kind", list(KINDS))
            counts = {v: sum(s[field] == v for s in small) for v in values}
            # flatten the answer prior: pick the answer value first (0 one time in five), then
            # an attribute having it; uniform attributes would make "0" or "1" a safe guess
            nonzero = sorted({n for n in counts.values() if n})
            zero = rng.random() < 0.2 and 0 in counts.values()  # 3 kinds can all be present
            answer = 0 if zero or not nonzero else rng.choice(nonzero)
            v = rng.choice([v for v in values if counts[v] == answer])
            out = q.format(**{field: v}), str(answer)
        elif qtype in ("cell_color", "cell_kind"):
            cells = _cell_candidates(small, g) or [
                s["cell"] for s in small if sum(t["cell"] == s["cell"] for t in small) == 1
            ]
            cell = rng.choice(cells)
            shape = next(s for s in small if s["cell"] == cell)
            out = q.format(cell=CELLS[g][cell]), shape["color" if qtype == "cell_color" else "kind"]
        else:
            raise ValueError(qtype)
        if out[0] not in asked:
            break
    return out


def make_sample(index: int, split: str, seed: int, opt: Options, planner: Planner):
    rng = random.Random(f"{split}/{seed}/{index}")  # str seeds hash deterministically (sha512)
    np_rng = np.random.default_rng([SPLIT_CODE[split], seed, index])
    qtypes = planner.qtypes_for(index)
    need_cell = any(q.startswith("cell_") for q in qtypes)
    # the count does not depend on the questions asked: with several turns nearly every image
    # has a cell question, and a floor of 2 there left "1" unseen by count_total in training
    scene = make_scene(rng, opt, rng.randint(opt.min_shapes, opt.max_shapes), need_cell)
    key = f"{split}-{index:08d}"
    asked, conversations, questions = set(), [], []
    for t, qtype in enumerate(qtypes):
        question, answer = ask(qtype, scene, rng, planner, asked, opt.grid)
        # a repeat (e.g. a second cell question on a one-shape image): another qtype of the family
        for alt in planner.by_family[FAMILY_OF[qtype]]:
            if question not in asked:
                break
            qtype = alt
            question, answer = ask(alt, scene, rng, planner, asked, opt.grid)
        asked.add(question)
        conversations += [
            {"from": "human", "value": ("<image>\n" + _context(split, seed, index, opt) if t == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
        questions.append(dict(family=FAMILY_OF[qtype], qtype=qtype, answer=answer))
    meta = dict(
        id=key, image=key + ".png", conversations=conversations, **questions[0], questions=questions, scene=scene
    )
    return {
        "__key__": key,
        "png": render_scene(scene, opt, rng, np_rng),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }


def _context(split: str, seed: int, index: int, opt: Options) -> str:
    """`opt.context_words` words of filler before the first question (its own random stream:
    the rest of the sample is the same with or without it)."""
    if not opt.context_words:
        return ""
    rng = random.Random(f"context/{split}/{seed}/{index}")
    words = _benchmark_words(opt.grid)
    return " ".join(rng.choice(words) for _ in range(opt.context_words)) + ". "


@functools.cache
def _benchmark_words(grid: int) -> tuple:
    """The benchmark's own words (sorted: the same draw on every machine), made once per grid."""
    texts = (*COLORS, *BACKGROUNDS, *KINDS, *CELLS[grid], "small big shape")
    return tuple(sorted({w for t in texts for w in t.split()}))


def write(out: str, split: str, n: int, seed: int, opt: Options, maxcount: int = 500, progress=True):
    import webdataset as wds
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    planner = Planner(random.Random(f"plan/{split}/{seed}"), opt, n)
    pattern = os.path.join(out, f"{split}-%06d.tar")
    # fixed mtime/owner: identical tar bytes for identical arguments
    counts = {}
    with wds.ShardWriter(
        pattern, maxcount=maxcount, verbose=0, mtime=TAR_MTIME, user="synthetic", group="synthetic"
    ) as sink:
        for i in tqdm(range(n), desc=f"synthetic {split}", unit="sample", disable=not progress):
            sink.write(make_sample(i, split, seed, opt, planner))
            name = os.path.basename(sink.fname)
            counts[name] = counts.get(name, 0) + 1
    sizes = dict(sorted(counts.items()))
    with open(os.path.join(out, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1, sort_keys=True)
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--split", choices=list(SPLIT_CODE), required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--min-shapes", type=int, default=1, help="small shapes per image, at least")
    p.add_argument("--max-shapes", type=int, default=5, help="small shapes per image, at most")
    p.add_argument("--grid", type=int, choices=[2, 3], default=2, help="cells for the cell questions")
    p.add_argument("--turns", type=int, default=None, help="questions per image (default: train 4, eval 1)")
    p.add_argument("--fine-share", type=float, default=0.5)
    p.add_argument("--qtypes", default=",".join(DEFAULT_QTYPES), help=f"from {sorted(FAMILY_OF)}")
    p.add_argument("--noise", type=float, default=0.0, help="pixel noise std (0: PNGs stay ~3 KB)")
    p.add_argument("--maxcount", type=int, default=500, help="samples per shard")
    p.add_argument(
        "--context-words", type=int, default=0, help="filler words before the first question (long sequences)"
    )
    a = p.parse_args(argv)
    qtypes = tuple(q for q in a.qtypes.split(",") if q)
    unknown = set(qtypes) - set(FAMILY_OF)
    if unknown:
        p.error(f"unknown qtypes {sorted(unknown)}")
    opt = Options(
        image_size=a.image_size,
        min_shapes=a.min_shapes,
        max_shapes=a.max_shapes,
        grid=a.grid,
        turns=a.turns or (4 if a.split == "train" else 1),
        fine_share=a.fine_share,
        qtypes=qtypes,
        noise=a.noise,
        context_words=a.context_words,
    )
    sizes = write(a.out, a.split, a.samples, a.seed, opt, a.maxcount)
    print(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards to {a.out}")


if __name__ == "__main__":
    main()
