"""Shard writers: LLaVA converter on a tiny 665k-format fixture, synthetic benchmark, inspect."""

import collections
import io
import json
import os
import re

import pytest
from PIL import Image

from shards import inspect as shard_inspect
from shards import llava, synthetic


def _image_bytes(fmt, size=(20, 12), color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def llava_fixture(tmp_path):
    """Records in llava_v1_5_mix665k.json's format: jpg, png in a sub-folder, text-only,
    a missing image and an unreadable one."""
    root = tmp_path / "images"
    (root / "coco/train2017").mkdir(parents=True)
    (root / "ocr_vqa/images").mkdir(parents=True)
    (root / "coco/train2017/000000033471.jpg").write_bytes(_image_bytes("JPEG"))
    (root / "ocr_vqa/images/1.5.png").write_bytes(_image_bytes("PNG"))
    (root / "coco/train2017/broken.jpg").write_bytes(b"not a jpeg at all")
    records = [
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                {"from": "gpt", "value": "The bus in the image is white and red."},
                {"from": "human", "value": "What feature can be seen on the back of the bus?"},
                {"from": "gpt", "value": "The back of the bus features an advertisement."},
            ],
        },
        {
            "id": "ocr.1/5",
            "image": "ocr_vqa/images/1.5.png",
            "conversations": [
                {"from": "human", "value": "Who wrote this book?\n<image>"},
                {"from": "gpt", "value": "Jane Doe"},
            ],
        },
        {
            "id": "wxIvrTG_0",
            "model": "",
            "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello."}],
        },
        {
            "id": "gone",
            "image": "coco/train2017/000000999999.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}],
        },
        {
            "id": "broken",
            "image": "coco/train2017/broken.jpg",
            "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A dog."}],
        },
    ]
    path = tmp_path / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records))
    return path, root, records


def test_llava_converter(llava_fixture, tmp_path, capsys):
    path, root, records = llava_fixture
    out = tmp_path / "shards"
    llava.main(["--json", str(path), "--image-root", str(root), "--out", str(out), "--maxcount", "2"])
    summary = capsys.readouterr().out
    assert "written 3 (2 with image, 1 text-only) in 2 shards" in summary
    assert "missing_image 1" in summary and "unreadable_image 1" in summary
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(s["id"], s["reason"]) for s in skipped} == {("gone", "missing_image"), ("broken", "unreadable_image")}
    assert json.loads((out / "sizes.json").read_text()) == {"llava-000000.tar": 2, "llava-000001.tar": 1}

    import webdataset as wds

    samples = list(wds.WebDataset(str(out / "llava-{000000..000001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert samples[0]["jpg"] == (root / records[0]["image"]).read_bytes()  # bytes as stored
    assert samples[1]["png"] == (root / records[1]["image"]).read_bytes()
    assert not {"jpg", "png"} & set(samples[2])  # text-only: json only
    assert [json.loads(s["json"])["id"] for s in samples] == ["000000033471", "ocr.1/5", "wxIvrTG_0"]
    assert json.loads(samples[0]["json"])["conversations"] == records[0]["conversations"]
    assert shard_inspect.inspect(str(out), show=1, out=io.StringIO()) == 0


def _write(tmp_path, name, **kw):
    opt = synthetic.Options(**{"image_size": 64, **kw.pop("opt", {})})
    out = tmp_path / name
    synthetic.write(
        str(out),
        kw.pop("split", "train"),
        kw.pop("n", 40),
        kw.pop("seed", 0),
        opt,
        maxcount=kw.pop("maxcount", 16),
        progress=False,
    )
    return out


def test_synthetic_deterministic(tmp_path):
    a, b = _write(tmp_path, "a"), _write(tmp_path, "b")
    c = _write(tmp_path, "c", seed=1)
    files = sorted(os.listdir(a))
    assert files == ["sizes.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "train-000000.tar").read_bytes() != (c / "train-000000.tar").read_bytes()
    e = _write(tmp_path, "e", split="eval", opt={"turns": 1})  # same seed, other split: other data
    import webdataset as wds

    train_png = {s["png"] for s in wds.WebDataset(str(a / "train-000000.tar"), shardshuffle=False)}
    eval_png = {s["png"] for s in wds.WebDataset(str(e / "eval-000000.tar"), shardshuffle=False)}
    assert not train_png & eval_png
    assert shard_inspect.inspect(str(a), show=0, out=io.StringIO()) == 0


SIX = ("background", "big_color", "big_is_color", "count_total", "count_color", "cell_color")


@pytest.mark.parametrize(
    "qtypes,turns,fine_share",
    [(tuple(synthetic.DEFAULT_QTYPES), 2, 0.5), (tuple(synthetic.DEFAULT_QTYPES), 2, 0.25), (SIX, 3, 0.5)],
)
def test_synthetic_balance(tmp_path, qtypes, turns, fine_share):
    n = 200
    out = _write(tmp_path, "s", n=n, maxcount=1000, opt={"turns": turns, "fine_share": fine_share, "qtypes": qtypes})
    import webdataset as wds

    metas = [json.loads(s["json"]) for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)]
    questions = [q for m in metas for q in m["questions"]]
    fams = collections.Counter(q["family"] for q in questions)
    assert fams["fine"] == round(n * turns * fine_share) and sum(fams.values()) == n * turns
    per_image = {sum(q["family"] == "fine" for q in m["questions"]) for m in metas}  # spread evenly
    assert per_image <= {int(turns * fine_share), int(turns * fine_share) + 1}
    counted = collections.Counter(len(m["scene"]["small"]) for m in metas)  # 1-5 whatever is asked
    assert set(counted) == {1, 2, 3, 4, 5} and min(counted.values()) > n / 5 / 2
    by_type = collections.Counter(q["qtype"] for q in questions)
    assert set(by_type) == set(qtypes)
    for fam in ("fine", "coarse"):  # qtypes equal within their family (decks: within a few)
        counts = [by_type[q] for q in qtypes if synthetic.FAMILY_OF[q] == fam]
        assert max(counts) - min(counts) <= 0.1 * fams[fam] + 2
    yes_no = collections.Counter(q["answer"] for q in questions if q["qtype"] == "big_is_color")
    assert abs(yes_no["yes"] - yes_no["no"]) <= 2
    for m in metas:
        conv = m["conversations"]
        assert len(conv) == 2 * turns and conv[0]["value"].startswith("<image>\n")
        assert all(len(c["value"].split()) == 1 for c in conv[1::2])  # one-word answers
        assert (m["family"], m["qtype"], m["answer"]) == tuple(
            m["questions"][0][k] for k in ("family", "qtype", "answer")
        )
        assert len({c["value"] for c in conv[0::2]}) == turns  # no question twice per image
        scene = m["scene"]
        for q, a in zip(conv[0::2], conv[1::2]):
            if q["value"].endswith("how many small shapes are there?"):
                assert a["value"] == str(len(scene["small"]))
            if "background" in q["value"]:
                assert a["value"] == scene["background"]
    # question-only guessing: the best answer per question text stays far from certain
    by_question = collections.defaultdict(collections.Counter)
    for m in metas:
        for q, a in zip(m["conversations"][0::2], m["conversations"][1::2]):
            by_question[q["value"].replace("<image>\n", "")][a["value"]] += 1
    guessed = sum(max(c.values()) for c in by_question.values()) / sum(sum(c.values()) for c in by_question.values())
    assert guessed < 0.5


def test_synthetic_vocabulary_covers_every_word(tmp_path):
    from pipeline.data.tokenizer import build_word_tokenizer

    out = _write(tmp_path, "v", n=30, opt={"qtypes": tuple(synthetic.FAMILY_OF), "grid": 3, "turns": 5})
    import webdataset as wds

    tok = build_word_tokenizer()
    vocab = set(synthetic.vocabulary())
    for s in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False):
        for turn in json.loads(s["json"])["conversations"]:
            text = turn["value"].replace("<image>", "")
            assert set(re.findall(r"\w+|[^\w\s]+", text.lower())) <= vocab
            assert tok.unk_token_id not in tok(text)["input_ids"]


def test_synthetic_cli(tmp_path, capsys):
    synthetic.main(
        [
            "--out",
            str(tmp_path / "ev"),
            "--split",
            "eval",
            "--samples",
            "6",
            "--seed",
            "3",
            "--image-size",
            "64",
            "--maxcount",
            "4",
        ]
    )
    assert "wrote 6 samples in 2 shards" in capsys.readouterr().out
    import webdataset as wds

    for s in wds.WebDataset(str(tmp_path / "ev/eval-{000000..000001}.tar"), shardshuffle=False):
        assert len(json.loads(s["json"])["conversations"]) == 2  # eval default: one question per sample


def test_inspect_reports_corrupt_shard(tmp_path):
    out = _write(tmp_path, "x", n=20, maxcount=10)
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    buf = io.StringIO()
    assert shard_inspect.inspect(str(out), show=0, out=buf) == 1
    assert "sizes.json says 10" in buf.getvalue()


@pytest.mark.parametrize("grid", [12, 16])
def test_object_map_matches_the_rendered_image(grid):
    """The object map derived from a sample's recorded scene agrees with its pixels: patches it
    calls background hold only the background colour, every small shape covers a SMALL patch, BIG
    patches lie under the big shape's box and fill a big square."""
    import numpy as np

    from shards.objects import BACKGROUND, BIG, SMALL, object_map

    opt = synthetic.Options()
    planner = synthetic.Planner(synthetic.random.Random("plan"), opt, 40)
    S, edges = opt.image_size, np.linspace(0, opt.image_size, grid + 1).round().astype(int)
    for i in range(40):
        sample = synthetic.make_sample(i, "eval", 3, opt, planner)
        scene = json.loads(sample["json"])["scene"]
        px = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")).astype(int)
        touched = object_map(scene, S, grid, min_cover=1e-9)  # any shape pixel at all
        colours, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
        bg = colours[counts.argmax()]
        for p in np.flatnonzero(touched == BACKGROUND):
            r, c = divmod(p, grid)
            patch = px[edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
            assert (patch == bg).all(), (i, p)
        m = object_map(scene, S, grid)

        def span(box):  # patches a box overlaps
            x0, y0, x1, y1 = box
            cols = np.flatnonzero((edges[1:] > x0) & (edges[:-1] < x1))
            rows = np.flatnonzero((edges[1:] > y0) & (edges[:-1] < y1))
            return {r * grid + c for r in rows for c in cols}

        for s in scene["small"]:
            assert any(m[p] == SMALL for p in span(s["box"])), (i, s)
        big = scene["big"]
        assert set(np.flatnonzero(m == BIG)) <= span(big["box"]), i
        if big["kind"] == "square":  # patches wholly inside the square are its own
            x0, y0, x1, y1 = big["box"]
            inside = {
                r * grid + c
                for r in range(grid)
                for c in range(grid)
                if edges[c] >= x0 and edges[c + 1] <= x1 and edges[r] >= y0 and edges[r + 1] <= y1
            }
            assert inside and all(m[p] == BIG for p in inside), i


# ---------------------------------------------------------------- the converter on hostile input


def _convert(path, root, out, *extra):
    llava.main(["--json", str(path), "--image-root", str(root), "--out", str(out), *extra])


def _turns(q="What is this?"):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A bus."}]


def test_llava_image_paths_stay_inside_the_root(llava_fixture, tmp_path, capsys, monkeypatch):
    """`..` or an absolute path was followed: a file outside --image-root was copied into a
    shard byte for byte, and /etc/passwd was read. Now refused by id and reason, never opened."""
    path, root, _ = llava_fixture
    secret = tmp_path / "outside.png"
    secret.write_bytes(_image_bytes("PNG", color=(1, 2, 3)))
    records = [
        {"id": "up", "image": "../outside.png", "conversations": _turns()},
        {"id": "deep", "image": "coco/train2017/../../../outside.png", "conversations": _turns()},
        {"id": "abs", "image": str(secret), "conversations": _turns()},
        {"id": "passwd", "image": "/etc/passwd", "conversations": _turns()},
        {"id": "inside", "image": "coco/../coco/train2017/000000033471.jpg", "conversations": _turns()},
    ]
    path.write_text(json.dumps(records))
    opened = []
    read = llava.read_image
    monkeypatch.setattr(llava, "read_image", lambda p: opened.append(p) or read(p))
    out = tmp_path / "shards"
    _convert(path, root, out)
    assert "written 1 (1 with image, 0 text-only)" in capsys.readouterr().out
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s["reason"]) for s in skipped] == [
        (i, "outside_image_root") for i in ("up", "deep", "abs", "passwd")
    ]
    assert opened == [str(root / "coco/train2017/000000033471.jpg")]
    assert secret.read_bytes() not in (out / "llava-000000.tar").read_bytes()


@pytest.mark.parametrize(
    "content, says",
    [
        (b'[{"id": "a", "conversations": [', "not valid JSON"),
        (b'[{"id": "caf\xe9"}]', "not UTF-8"),  # latin-1
        (b'{"id": "a"}', "expected a JSON list"),
        (None, "No such file"),
    ],
)
def test_llava_bad_json_file_is_one_clean_error(llava_fixture, tmp_path, content, says):
    _, root, _ = llava_fixture
    path = tmp_path / "in.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        _convert(path, root, tmp_path / "out")
    assert isinstance(e.value.code, str) and str(path) in e.value.code and says in e.value.code
    assert not (tmp_path / "out").exists()


def test_llava_any_record_shape_is_a_counted_skip(llava_fixture, tmp_path, capsys):
    """A null record, `"image": 123`, a lone surrogate, ... raised tracebacks and left a partial
    tar without sizes.json; each is now skipped, listed and counted by reason."""
    path, root, _ = llava_fixture
    text_only = {"id": "ok", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}
    records = [
        None,
        5,
        ["a list"],
        {"id": "noconv"},
        {"id": "convstr", "conversations": "hi"},
        {"id": "turnint", "conversations": [{"from": "human", "value": 5}]},
        {"id": "img123", "image": 123, "conversations": _turns()},
        {"id": "imgnul", "image": "a\u0000b.jpg", "conversations": _turns()},
        {"id": "surrogate", "conversations": [{"from": "human", "value": "\ud800"}, {"from": "gpt", "value": "x"}]},
        text_only,
    ]
    path.write_text(json.dumps(records))  # ensure_ascii: the surrogate as a \ud800 escape
    out = tmp_path / "shards"
    _convert(path, root, out)
    summary = capsys.readouterr().out
    assert "written 1 (0 with image, 1 text-only) in 1 shards" in summary
    assert (
        "skipped: bad_conversations 3, bad_image_field 2, bad_text 1, not_an_object 3 "
        f"(ids in {out / 'skipped.jsonl'})" in summary
    )
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["index"], s["reason"]) for s in skipped][-3:] == [
        (6, "bad_image_field"),
        (7, "bad_image_field"),
        (8, "bad_text"),
    ]
    assert json.loads((out / "sizes.json").read_text()) == {"llava-000000.tar": 1}
    assert shard_inspect.inspect(str(out), show=0, out=io.StringIO()) == 0


def test_llava_out_refused_unless_overwrite_which_replaces_it(llava_fixture, tmp_path, capsys):
    """A rerun with fewer shards left the old tars beside the new ones (exact mode reads them)."""
    path, root, _ = llava_fixture
    out = tmp_path / "shards"
    _convert(path, root, out, "--maxcount", "1")
    assert len(list(out.glob("*.tar"))) == 3
    with pytest.raises(SystemExit) as e:
        _convert(path, root, out, "--maxcount", "2")
    assert "--overwrite" in str(e.value.code) and len(list(out.glob("*.tar"))) == 3
    _convert(path, root, out, "--maxcount", "2", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [
        "llava-000000.tar",
        "llava-000001.tar",
        "sizes.json",
        "skipped.jsonl",
    ]
    assert json.loads((out / "sizes.json").read_text()) == {"llava-000000.tar": 2, "llava-000001.tar": 1}
    (out / "notes.txt").write_text("mine")  # not a conversion's: never removed
    with pytest.raises(SystemExit, match="notes.txt"):
        _convert(path, root, out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.glob("*.tar"))) == 2


def test_llava_output_appears_only_when_complete(llava_fixture, tmp_path, monkeypatch, capsys):
    """Interrupted in the middle: no tar and no sizes.json in --out (a previous conversion stays
    whole); the next run starts clean."""
    path, root, _ = llava_fixture
    read = llava.read_image

    def interrupted(p):
        if p.endswith(".png"):  # the second record's image
            raise KeyboardInterrupt
        return read(p)

    out = tmp_path / "shards"
    monkeypatch.setattr(llava, "read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _convert(path, root, out, "--maxcount", "1")
    assert not out.exists()
    monkeypatch.setattr(llava, "read_image", read)
    _convert(path, root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(llava, "read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _convert(path, root, out, "--maxcount", "1", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(llava, "read_image", read)
    _convert(path, root, out, "--maxcount", "1", "--overwrite")
    assert json.loads((out / "sizes.json").read_text()) == {f"llava-00000{i}.tar": 1 for i in range(3)}
    assert not (tmp_path / "shards.partial").exists() and not (tmp_path / "shards.old").exists()


def test_synthetic_context_words_lengthen_only_the_first_question(tmp_path):
    """--context-words: that many benchmark words before the first question (the 2048-token runs);
    images, questions and answers are those of the same sample without it."""
    import webdataset as wds

    from pipeline.data.tokenizer import build_word_tokenizer

    plain, long = _write(tmp_path, "plain", n=6), _write(tmp_path, "long", n=6, opt={"context_words": 300})

    def samples(d):
        return [s for f in sorted(os.listdir(d)) if f.endswith(".tar") for s in wds.WebDataset(str(d / f))]

    tok = build_word_tokenizer()
    for a, b in zip(samples(plain), samples(long), strict=True):
        assert a["png"] == b["png"]
        ca, cb = json.loads(a["json"])["conversations"], json.loads(b["json"])["conversations"]
        assert ca[1:] == cb[1:]
        first_a, first_b = ca[0]["value"], cb[0]["value"]
        assert first_b.startswith("<image>\n") and first_b.endswith(first_a.removeprefix("<image>\n"))
        context = first_b.removeprefix("<image>\n").removesuffix(first_a.removeprefix("<image>\n"))
        assert len(context.split()) == 300
        ids = tok(context, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids  # every word is in the word tokenizer's vocabulary
