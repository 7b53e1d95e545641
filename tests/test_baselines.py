"""Training-free pruning baselines (model/baselines.py) on ATP's hard path. Tiny, CPU, fp32.

The tiny model mirrors the embedded one's shape where it matters: 12 decoder layers, a 12 x 12
grid (Lv = 144), 2 CLIP layers, vision_feature_layer -1, "default" strategy (CLS dropped).
"""

import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from model import CACHE_KW, AtpLlavaForConditionalGeneration
from model.baselines import POLICIES, VisionTap, grid_indices, make_policy, top_n
from model.budget import n_bar

from tiny_models import tiny_llava_config

VOCAB, IMAGE_TOKEN, GRID = 120, 119, 12
LV = GRID * GRID
LAYERS = 12
SHARES = (0.25, 0.15, 0.11)


def tiny_model(seed=0, feature_layer=-1, layers=LAYERS, **atp):
    torch.manual_seed(seed)
    cfg = tiny_llava_config(layers=layers, grid=GRID, max_positions=512, vision_feature_layer=feature_layer)
    llava = LlavaForConditionalGeneration(cfg).eval()
    atp.setdefault("atp_layers", [1, 5, 9])
    atp.setdefault("target_tokens", LV * 0.25)
    atp.setdefault("threshold_hidden", 32)
    atp.setdefault("spatial_strides", [2, 3, 4, 6])
    return llava, AtpLlavaForConditionalGeneration.from_llava(llava, **atp).eval()


def batch(prefixes, suffixes, seed=0, text_only=()):
    """Left-padded prompts [prefix] <image>*LV [suffix], one image per image sample."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, (p, s) in enumerate(zip(prefixes, suffixes)):
        img = [] if b in text_only else [IMAGE_TOKEN] * LV
        rows.append(
            torch.randint(1, 100, (p,), generator=g).tolist() + img + torch.randint(1, 100, (s,), generator=g).tolist()
        )
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, L - len(r) :] = torch.tensor(r)
        mask[b, L - len(r) :] = 1
    n_img = len(rows) - len(text_only)
    pix = torch.randn(n_img, 3, GRID * 8, GRID * 8, generator=g) if n_img else None
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix)


@pytest.fixture(scope="module")
def model():
    return tiny_model()[1]


def test_grid_and_top_n_helpers():
    assert grid_indices(12, 16) == [r * 12 + c for r in (1, 4, 7, 10) for c in (1, 4, 7, 10)]
    for n in (1, 5, 16, 22, 36, 100, 143, 144):
        idx = grid_indices(12, n)
        assert len(set(idx)) == n and all(0 <= i < 144 for i in idx)
    live = torch.tensor([[True, True, False, True], [False] * 4])
    keep = top_n(torch.tensor([[3.0, 1.0, 9.0, 2.0], [1.0, 2.0, 3.0, 4.0]]), live, 2)
    assert keep.tolist() == [[True, False, False, True], [False] * 4]


# -- every policy, every budget ------------------------------------------------------------------
@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("name", POLICIES)
def test_policy_reaches_matched_budget(model, name, share):
    b = batch([3, 6, 2], [5, 3, 4], seed=1, text_only=(1,))
    policy = make_policy(name, model.config, share)
    model.pruning_policy = policy
    try:
        with torch.no_grad():
            out = model(**b)
    finally:
        model.pruning_policy = None
    vt = out.visual_tokens
    assert vt.shape == (3, LAYERS)
    assert (vt[1] == 0).all()  # the text-only sample
    for i in (0, 2):
        assert vt[i].mean().item() == pytest.approx(n_bar(policy.layers, policy.counts, LAYERS, LV))
        assert abs(vt[i].mean().item() - share * LV) <= 0.5, (name, share, vt[i])
        # layers before the first pruning point see all Lv, then the policy's counts
        first = policy.layers[0]
        assert (vt[i, :first] == LV).all() and vt[i, first] == policy.counts[0]
    assert torch.isfinite(out.logits).all()
    d = policy.describe()
    assert d["name"] == name and d["paper"] and d["differs"] and d["layers"] == policy.layers
    assert abs(d["n_bar"] - share * LV) <= 0.5


@pytest.mark.parametrize("name", POLICIES)
def test_generate_uses_the_pruned_cache_and_matches_uncached_recompute(model, name):
    b = batch([3, 5], [4, 2], seed=4)
    prompt = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    model.pruning_policy = make_policy(name, model.config, 0.15)
    try:
        with torch.no_grad():
            first = model(**prompt).logits[:, -1]
        gen = model.generate(
            **prompt, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert (gen.logits[0] - first).abs().max() <= 1e-5  # eval forward == generate's first step
        new = gen.sequences[:, b["input_ids"].shape[1] :]
        L0 = b["input_ids"].shape[1]
        # the query text is the prompt's text after the image; generated tokens never join it
        after = torch.arange(L0) > torch.nonzero(b["input_ids"][0] == IMAGE_TOKEN).max()
        qmask = b["attention_mask"].bool() & (b["input_ids"] != IMAGE_TOKEN) & after
        ids, mask = b["input_ids"], b["attention_mask"]
        with torch.no_grad():
            for t in range(new.shape[1]):
                qm = torch.cat([qmask, torch.zeros(2, ids.shape[1] - L0, dtype=torch.bool)], 1)
                out = model(input_ids=ids, attention_mask=mask, pixel_values=b["pixel_values"], query_mask=qm)
                assert torch.equal(out.logits[:, -1].argmax(-1), new[:, t]), (name, t)
                assert (out.logits[:, -1] - gen.logits[t]).abs().max() <= 1e-4, (name, t)
                ids = torch.cat([ids, new[:, t : t + 1]], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        # the cache holds the kept visual tokens only, group by group
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config.get_text_config())
        with torch.no_grad():
            out = model(**prompt, **{CACHE_KW: cache}, use_cache=True)
        text = (b["attention_mask"].bool() & (b["input_ids"] != IMAGE_TOKEN)).sum(1)
        state = cache.atp_state
        for j in range(LAYERS):
            live = state["group_live"][state["group_of_layer"][j]]
            assert torch.equal(live.sum(1), text + out.visual_tokens[:, j].long()), (name, j)
            assert cache.layers[j].keys.shape[-2] == live.shape[1]
        assert torch.equal(state["next_pos"], b["attention_mask"].sum(1))
    finally:
        model.pruning_policy = None


# -- single policies -----------------------------------------------------------------------------
def test_random_is_reproducible_by_seed(model):
    b = batch([3, 4], [4, 4], seed=2)
    keeps = {}
    for seed in (0, 0, 1):
        model.pruning_policy = make_policy("random", model.config, 0.25, seed=seed)
        with torch.no_grad():
            keeps.setdefault(seed, []).append(model(**b).atp_info["keep"])
    model.pruning_policy = None
    assert torch.equal(keeps[0][0], keeps[0][1])
    assert not torch.equal(keeps[0][0], keeps[1][0])
    assert (keeps[0][0].sum(-1) == 36).all()


def test_uniform_keeps_the_expected_grid(model):
    b = batch([2, 5], [3, 3], seed=3)
    model.pruning_policy = make_policy("uniform", model.config, 0.11)  # 16 of 144: the centred stride-3 grid
    with torch.no_grad():
        keep = model(**b).atp_info["keep"][:, 0]
    model.pruning_policy = None
    want = torch.zeros(LV, dtype=torch.bool)
    want[[r * GRID + c for r in (1, 4, 7, 10) for c in (1, 4, 7, 10)]] = True
    assert torch.equal(keep.bool(), want.expand(2, LV))


@pytest.mark.parametrize("name", ["uniform", "random", "fastv"])
def test_keeping_every_token_reproduces_unpruned_logits(name):
    llava, m = tiny_model(seed=5, pruning="none")
    b = batch([3, 6], [4, 2], seed=5)
    live = b["attention_mask"].bool()
    with torch.no_grad():
        ref = m(**b)
        m.pruning_policy = make_policy(name, m.config, 1.0)
        out = m(**b)
    assert m.pruning_policy.counts == [LV]
    assert (ref.logits - out.logits)[live].abs().max() <= 1e-5
    assert (out.visual_tokens == LV).all()


def test_policy_none_restores_atp_and_training_ignores_the_policy():
    _, m = tiny_model(seed=6)
    b = batch([3, 5], [4, 4], seed=6)
    with torch.no_grad():
        before = m(**b)
        m.pruning_policy = make_policy("fastv", m.config, 0.11)
        pruned = m(**b)
        m.pruning_policy = None
        after = m(**b)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.visual_tokens, after.visual_tokens)
    assert "thresholds" in after.atp_info and "thresholds" not in pruned.atp_info
    assert not torch.equal(before.visual_tokens, pruned.visual_tokens)
    # train mode (soft path): the policy is not honoured
    m.train()
    with torch.no_grad():
        soft = m(**b)
        m.pruning_policy = make_policy("uniform", m.config, 0.11)
        soft_policy = m(**b)
    m.pruning_policy = None
    m.eval()
    assert torch.equal(soft.logits, soft_policy.logits)
    m.pruning_policy = make_policy(
        "uniform", tiny_model(layers=6, atp_layers=[1, 3])[1].config, 0.25
    )  # another model's
    try:
        with pytest.raises(ValueError, match="another model"):
            m(**b)
    finally:
        m.pruning_policy = None
    with pytest.raises(ValueError, match="atp_masks"):
        m.pruning_policy = make_policy("uniform", m.config, 0.11)
        try:
            m(**b, atp_masks=[torch.ones(2, LV)] * 3)
        finally:
            m.pruning_policy = None


def test_fastv_uses_largest_feasible_k_and_ranks_by_text_attention():
    llava, m = tiny_model(seed=7, pruning="none")
    p = make_policy("fastv", m.config, 0.11)  # K=2 costs 2 * 144 / 12 = 24 > 15.84 tokens: K=1
    assert p.layers == [1] and "cannot reach" in p.describe()["differs"][0]
    assert make_policy("fastv", m.config, 0.25).layers == [2]
    # the kept tokens are the top-n by head-mean attention probability from the text after the image in layer K-1
    b = batch([4, 2], [5, 3], seed=7)
    m.pruning_policy = p
    with torch.no_grad():
        keep = m(**b).atp_info["keep"][:, 0].bool()
    llava.set_attn_implementation("eager")
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = llava(**b, position_ids=pos, output_attentions=True)
    probs = ref.attentions[0].mean(1)  # layer K-1 = 0
    for i in range(2):
        ids = b["input_ids"][i]
        vis = torch.nonzero(ids == IMAGE_TOKEN).flatten()
        text = torch.nonzero((torch.arange(ids.shape[0]) > vis[-1]) & b["attention_mask"][i].bool()).flatten()
        score = probs[i][text][:, vis].mean(0)
        want = torch.zeros(LV, dtype=torch.bool)
        want[score.topk(p.counts[0]).indices] = True
        assert torch.equal(keep[i], want)


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_vision_tap_reads_the_layer_llava_uses(feature_layer):
    llava, m = tiny_model(seed=8, feature_layer=feature_layer, pruning="none")
    b = batch([2], [3], seed=8)
    tap = VisionTap(m)
    with tap, torch.no_grad():
        feats = m.model.get_image_features(
            pixel_values=b["pixel_values"], vision_feature_layer=feature_layer, vision_feature_select_strategy="default"
        )
    proj = m.model.multi_modal_projector(tap.features())
    assert torch.allclose(proj, feats.pooler_output[0][None], atol=1e-6)
    tower = llava.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tower(b["pixel_values"], output_attentions=True)
    want = ref.attentions[feature_layer][:, :, 0, 1:].mean(1)
    assert torch.allclose(tap.cls_attention(), want, atol=1e-6)


def test_merging_policies_change_kept_features_and_split_the_budget(model):
    b = batch([3], [4], seed=9)
    for name in ("prumerge", "prumerge+", "visionzip"):
        p = make_policy(name, model.config, 0.25)
        model.pruning_policy = p
        with torch.no_grad():
            out = model(**b)
        model.pruning_policy = None
        assert out.visual_tokens[0, 0] == 36
        d = p.describe()
        if name == "visionzip":
            assert d["n_dominant"] + d["n_contextual"] == 36 and d["n_contextual"] == round(36 * 10 / 64)
        if name == "prumerge+":
            keep = out.atp_info["keep"][0, 0].bool()
            assert keep[grid_indices(GRID, d["n_uniform"])].all()
        if name.startswith("prumerge"):
            assert "iqr_outliers_mean" in d
    sv = make_policy("sparsevlm", model.config, 0.11)
    assert sv.layers == [1, 2, 6] and math.isclose(sv.describe()["n_bar"], n_bar(sv.layers, sv.counts, LAYERS, LV))
