"""The streaming loader: template and label masking, splitting, resampling, bad input."""

import io
import json
import logging

import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from pipeline.data.loader import DataConfig, build_loader, build_prompt_batch, collate
from pipeline.data.template import BadSample, encode, parse_conversation
from pipeline.data.tokenizer import build_word_tokenizer
from shards import synthetic

from tiny_pipeline import reversed_roles_shard

N_IMG = 3  # image tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()


@pytest.fixture(scope="module")
def proc():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _kw(tok):
    return dict(image_token_id=tok.convert_tokens_to_ids("<image>"), num_image_tokens=N_IMG)


def _png(mode="RGB", size=(24, 16), fmt="PNG"):
    color = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "L": 90, "CMYK": (0, 200, 200, 0)}[mode]
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _conv(*turns):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(turns)]


def _synthetic(tmp_path, n, maxcount, split="train"):
    out = tmp_path / f"syn-{n}-{maxcount}"
    synthetic.write(str(out), split, n, 0, synthetic.Options(image_size=64, turns=2), maxcount=maxcount, progress=False)
    return out


# ---------------------------------------------------------------- template


def test_labels_token_by_token(tok):
    turns, _ = parse_conversation(
        _conv("<image>\nWhat color is the background?", "gray", "how many small shapes are there?", "3"),
        has_image=True,
        key="k",
    )
    enc = encode(turns, tok, max_length=512, **_kw(tok))
    system = (
        "a chat between a curious user and an artificial intelligence assistant . the assistant gives "
        "helpful , detailed , and polite answers to the user ' s questions ."
    ).split()
    # (token, is a label, is the query); hand-written from LLaVA-1.5's vicuna_v1 template
    expected = (
        [("<s>", 0, 0)]
        + [(w, 0, 0) for w in system]
        + [("user", 0, 0), (":", 0, 0)]
        + [("<image>", 0, 0)] * N_IMG
        + [(w, 0, 1) for w in "what color is the background ?".split()]
        + [("assistant", 0, 0), (":", 0, 0), ("gray", 1, 0), ("</s>", 1, 0), ("user", 0, 0), (":", 0, 0)]
        + [(w, 0, 0) for w in "how many small shapes are there ?".split()]
        + [("assistant", 0, 0), (":", 0, 0), ("3", 1, 0), ("</s>", 1, 0)]
    )
    got_tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert got_tokens == [t for t, _, _ in expected]
    for i, (t, is_label, is_query) in enumerate(expected):
        assert enc["labels"][i] == (enc["input_ids"][i] if is_label else -100), (i, t)
        assert enc["query_mask"][i] == bool(is_query), (i, t)
    assert enc["image_start"] == len(system) + 3 and not enc["truncated"]


def test_image_moved_to_front_and_prompt(tok, proc):
    sample = {
        "__key__": "s0",
        "png": _png(),
        "json": json.dumps(
            {"conversations": _conv("what color is the big shape?\n<image>", "red", "how many shapes?", "4")}
        ).encode(),
    }
    text_only = {"__key__": "s1", "json": json.dumps({"conversations": _conv("say hi", "hi")}).encode()}
    batch = build_prompt_batch([sample, text_only], tok, proc, **_kw(tok))
    assert batch["answers"] == ["4", "hi"]
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padded
    assert tok.convert_ids_to_tokens(batch["input_ids"][0])[-12:] == [
        "assistant",
        ":",
        "red",
        "</s>",
        "user",
        ":",
        "how",
        "many",
        "shapes",
        "?",
        "assistant",
        ":",
    ]
    assert tok.decode(batch["input_ids"][0]).endswith("? assistant : red </s> user : how many shapes? assistant :")
    s = batch["image_start"][0]
    assert (batch["input_ids"][0, s : s + N_IMG] == _kw(tok)["image_token_id"]).all()
    assert tok.decode(batch["input_ids"][0][batch["query_mask"][0]]) == "what color is the big shape?"
    assert not batch["query_mask"][1].any() and batch["image_start"][1] == -1
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["has_image"].tolist() == [True, False]
    labelled = batch["input_ids"][batch["labels"] != -100]  # earlier answers only
    assert tok.convert_ids_to_tokens(labelled) == ["red", "</s>"]


def test_truncation_never_cuts_image_tokens(tok):
    turns, _ = parse_conversation(
        _conv("<image>\nwhat color is the background?", "gray", "what color?", "red"), has_image=True, key="k"
    )
    full = encode(turns, tok, max_length=512, **_kw(tok))
    cut = encode(turns, tok, max_length=len(full["input_ids"]) - 4, **_kw(tok))
    assert cut["truncated"] and cut["input_ids"] == full["input_ids"][: len(full["input_ids"]) - 4]
    with pytest.raises(BadSample, match="too_long"):  # a cut inside the image tokens drops the sample
        encode(turns, tok, max_length=full["image_start"] + 2, **_kw(tok))
    with pytest.raises(BadSample, match="too_long"):
        encode(turns, tok, max_length=len(full["input_ids"]) - 4, overlong="drop", **_kw(tok))


def test_pad_mode_fills_with_processor_mean(proc):
    from pipeline.data.template import preprocess_image

    pv = preprocess_image(Image.new("RGB", (40, 20), (255, 0, 0)), proc)  # wide: padded top and bottom
    mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
    pad = (torch.tensor([int(m * 255) for m in proc.image_mean]) / 255 - mean) / std
    assert torch.allclose(pv[:, 0, 16], pad, atol=0.02) and torch.allclose(pv[:, -1, 16], pad, atol=0.02)
    assert torch.allclose(pv[:, 16, 16], (torch.tensor([1.0, 0, 0]) - mean) / std, atol=0.02)


def test_tokenizer_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "USER: <image>\nhow many small red shapes are there? ASSISTANT: 3</s>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert again.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids("<image>")


def test_collate_right_pads():
    a = dict(
        __key__="a",
        input_ids=[5, 6, 7],
        labels=[-100, 6, 7],
        query_mask=[0, 1, 0],
        image_start=-1,
        pixel_values=None,
        meta={},
        reference=None,
    )
    b = dict(a, __key__="b", input_ids=[8], labels=[8], query_mask=[1])
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["query_mask"].tolist() == [[False, True, False], [True, False, False]]
    assert batch["pixel_values"] is None


# ---------------------------------------------------------------- splitting


def _keys(loader):
    return [k for batch in loader for k in batch["keys"]]


def test_exact_mode_each_sample_once_over_ranks_and_workers(tmp_path, tok, proc):
    shards = _synthetic(tmp_path, 32, 4)  # 8 shards
    seen = []
    for rank in range(2):
        cfg = DataConfig(shards=str(shards), batch_size=3, num_workers=2, shuffle_buffer=5, resampled=False)
        seen += _keys(build_loader(cfg, tok, proc, rank=rank, world_size=2, **_kw(tok)))
    assert sorted(seen) == [f"train-{i:08d}" for i in range(32)]


def test_resampled_gives_every_rank_the_same_batch_count(tmp_path, tok, proc):
    shards = _synthetic(tmp_path, 15, 4)  # 4 uneven shards
    counts = []
    for rank in range(2):
        cfg = DataConfig(
            shards=str(shards) + "/train-{000000..000003}.tar",
            batch_size=2,
            num_workers=2,
            shuffle_buffer=4,
            resampled=True,
            epoch_samples=20,
        )
        loader = build_loader(cfg, tok, proc, rank=rank, world_size=2, **_kw(tok))
        batches = list(loader)
        assert loader.num_batches == 5
        assert all(len(b["keys"]) == 2 for b in batches)
        counts.append(len(batches))
    assert counts == [5, 5]


# ---------------------------------------------------------------- bad input


def _bad_shards(tmp_path):
    good = lambda q: json.dumps({"image": "x.png", "conversations": _conv("<image>\n" + q, "yes")}).encode()
    samples = [
        {"__key__": "ok", "png": _png(), "json": good("is it red?")},
        {"__key__": "rgba", "png": _png("RGBA"), "json": good("is it red?")},
        {"__key__": "gray", "png": _png("L"), "json": good("is it gray?")},
        {"__key__": "cmyk", "jpg": _png("CMYK", fmt="JPEG"), "json": good("is it cyan?")},
        {"__key__": "textonly", "json": json.dumps({"conversations": _conv("say yes", "yes")}).encode()},
        {"__key__": "missing", "json": good("is it red?")},
        {"__key__": "badimage", "png": b"\x89PNG\r\n\x1a\n garbage", "json": good("is it red?")},
        {
            "__key__": "nomarker",
            "png": _png(),
            "json": json.dumps({"conversations": _conv("is it red?", "yes")}).encode(),
        },
        {"__key__": "twomarkers", "png": _png(), "json": good("<image> is it red?")},
        {"__key__": "toolong", "png": _png(), "json": good("is it red? " * 40)},
        {
            "__key__": "emptyturn",
            "png": _png(),
            "json": json.dumps({"conversations": _conv("<image>\nhi", " ")}).encode(),
        },
        {"__key__": "badjson", "png": _png(), "json": b'{"conversations": [oops'},
    ]
    with wds.TarWriter(str(tmp_path / "a-000000.tar"), encoder=False) as w:
        for s in samples:
            w.write(s)
    buf = io.BytesIO()  # a shard cut off inside its third sample's image
    with wds.TarWriter(buf, encoder=False) as w:
        for i in range(3):
            w.write({"__key__": f"t{i}", "png": _png(size=(64, 64)), "json": good("is it red?")})
    data = buf.getvalue()
    (tmp_path / "a-000001.tar").write_bytes(data[: data.index(b"t2.png") + 512 + 50])  # header + 50 bytes
    (tmp_path / "a-000002.tar").write_bytes(b"this is not a tar file" * 100)
    return ["ok", "rgba", "gray", "cmyk", "textonly", "t0", "t1"]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_input_skipped_counted_logged_once(tmp_path, tok, proc, caplog, workers):
    expected = _bad_shards(tmp_path)
    cfg = DataConfig(
        shards=str(tmp_path / "a-{000000..000002}.tar"),
        batch_size=4,
        num_workers=workers,
        shuffle_buffer=0,
        resampled=False,
        max_length=80,
        overlong="drop",
    )
    loader = build_loader(cfg, tok, proc, **_kw(tok))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(expected)
    stats = loader.stats
    for kind, key in [
        ("missing_image", "missing"),
        ("bad_image", "badimage"),
        ("no_image_marker", "nomarker"),
        ("extra_image_marker", "twomarkers"),
        ("too_long", "toolong"),
        ("empty_turn", "emptyturn"),
        ("malformed_json", "badjson"),
    ]:
        assert stats[kind] >= 1, kind
        if workers == 0:  # worker processes log to their own stderr
            assert sum(f"({kind}) {key}:" in r.getMessage() for r in caplog.records) == 1, kind
    assert stats["bad_tar"] == 2  # the truncated shard and the garbage file, once each
    assert stats["missing_image"] == 2  # `missing`, and t2 whose png the truncation cut off
    assert stats["converted_image"] == 3  # RGBA, L, CMYK: converted, not skipped
    for b in batches:  # text-only: no pixel_values row, no image tokens
        # (exact mode batches by position: a batch left with the text-only sample alone has none)
        assert (0 if b["pixel_values"] is None else b["pixel_values"].shape[0]) == int(b["has_image"].sum())
        for i, k in enumerate(b["keys"]):
            assert (b["image_start"][i] == -1) == (k == "textonly")


def test_shard_cut_inside_a_header_counts_its_lost_samples(tmp_path, tok, proc, caplog):
    """A tar cut inside a tar header ended that shard quietly after 4 of its 10 samples: the 6
    lost ones are now counted (`lost_samples`, against sizes.json) and the shard named."""
    good = json.dumps({"conversations": _conv("say yes", "yes")}).encode()
    for name in ("a-000000.tar", "a-000001.tar"):
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False) as w:
            for i in range(10):
                w.write({"__key__": f"{name[:8]}-{i:02d}", "json": good})
        data = buf.getvalue()
        if name == "a-000001.tar":
            data = data[: data.index(b"a-000001-04.json") + 100]  # inside the 5th sample's header
        (tmp_path / name).write_bytes(data)
    (tmp_path / "sizes.json").write_text(json.dumps({"a-000000.tar": 10, "a-000001.tar": 10}))
    cfg = DataConfig(shards=str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=0, resampled=False)
    loader = build_loader(cfg, tok, proc, **_kw(tok))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.loader"):
        keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == 14
    assert loader.stats["lost_samples"] == 6
    assert any("a-000001.tar: 4 of the 10 samples" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)  # the bug: this loop never ended
@pytest.mark.parametrize("workers", [0, 1])
def test_every_sample_bad_stops_with_a_named_error(tmp_path, tok, proc, workers):
    """Probe: with every sample bad (16 records with reversed roles) the resampled loader
    skipped forever. Now `max_consecutive_bad` in a row raise TooManyBadSamples, from a worker
    process too; a good sample in between resets the count."""
    from pipeline.data.loader import TooManyBadSamples

    shards = reversed_roles_shard(tmp_path / "bad")
    cfg = DataConfig(shards=str(shards), batch_size=4, num_workers=workers, shuffle_buffer=0, max_consecutive_bad=40)
    with pytest.raises(TooManyBadSamples, match=r"40 bad samples in a row .*bad_conversation"):
        next(iter(build_loader(cfg, tok, proc, **_kw(tok))))
    # 12 bad samples between good ones never reach a limit of 13
    good = json.dumps({"conversations": _conv("say yes", "yes")}).encode()
    with wds.TarWriter(str(tmp_path / "mixed-000000.tar"), encoder=False) as w:
        for i in range(4 * 13):
            w.write({"__key__": f"m{i}", "json": good if i % 13 == 12 else b'{"conversations": 1}'})
    cfg = DataConfig(
        shards=str(tmp_path / "mixed-000000.tar"),
        batch_size=2,
        num_workers=workers,
        shuffle_buffer=0,
        resampled=False,
        max_consecutive_bad=13,
    )
    assert sum(len(b["keys"]) for b in build_loader(cfg, tok, proc, **_kw(tok))) == 4
