"""The packed hard path (`hard_layout: packed`, model/packed.py) against the padded reference. CPU, fp32."""

import pytest
import torch
from transformers import DynamicCache

from model import CACHE_KW
from model.baselines import make_policy
from model.packed import PackedKeys, varlen_attention

from tiny_models import make_batch, tiny_atp

VARIANTS = {
    "atp": dict(),
    "fixed": dict(pruning="fixed", fixed_counts=[10, 4]),
    "extended": dict(atp_layers=(0, 2, 4), score_self="duplication", merge="nearest", threshold_features=["query"]),
    "none": dict(pruning="none"),
}


def prompt(padding, seed=1, text_only=(1,)):
    b = make_batch([2, 5, 3], [6, 3, 4], padding=padding, seed=seed, text_only=text_only)
    return {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def both(m, **inputs):
    out = {}
    with torch.no_grad():
        for layout in ("padded", "packed"):
            m.config.hard_layout = layout
            out[layout] = m(**inputs)
    return out["padded"], out["packed"]


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_logits_equal_padded(padding, variant):
    _, m = tiny_atp(**VARIANTS[variant])
    m.eval()
    inputs = prompt(padding)
    ref, out = both(m, **inputs)
    live = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[live], ref.logits[live], atol=1e-5, rtol=0)
    assert torch.equal(out.visual_tokens, ref.visual_tokens)
    if variant not in ("none",):  # the samples keep different counts: the case packing is for
        assert out.visual_tokens[[0, 2], -1].ne(0).all() and out.visual_tokens[1].eq(0).all()
        assert torch.equal(out.atp_info["keep"], ref.atp_info["keep"])


def test_packed_logits_equal_padded_for_a_policy_with_merged_features():
    _, m = tiny_atp(atp_layers=(2,))
    m.eval()
    m.pruning_policy = make_policy("prumerge+", m.config, 0.25)
    inputs = prompt("left", text_only=())
    ref, out = both(m, **inputs)
    live = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.logits[live], ref.logits[live], atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["atp", "extended"])
def test_packed_decoding_equals_padded_and_the_cache_holds_the_kept_tokens(variant):
    _, m = tiny_atp(**VARIANTS[variant])
    m.eval()
    inputs = prompt("left")
    B = inputs["input_ids"].shape[0]
    caches, logits = {}, {}
    with torch.no_grad():
        for layout in ("padded", "packed"):
            m.config.hard_layout = layout
            cache = DynamicCache(config=m.config.get_text_config())
            out = m(**inputs, **{CACHE_KW: cache}, use_cache=True)
            steps = [out.logits[:, -1]]
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                step = m(input_ids=nxt, **{CACHE_KW: cache}, use_cache=True).logits[:, -1]
                steps.append(step)
                nxt = step.argmax(-1)[:, None]
            caches[layout], logits[layout] = cache, torch.stack(steps, 1)
    torch.testing.assert_close(logits["packed"], logits["padded"], atol=1e-5, rtol=0)
    # each layer's packed cache holds exactly each sample's text and kept visual tokens, plus 3 steps
    text = (inputs["attention_mask"].bool() & (inputs["input_ids"] != m.config.image_token_id)).sum(1)
    kept = out.visual_tokens.long()
    for j, layer in enumerate(caches["packed"].layers):
        assert layer.keys.shape[:3] == (
            1,
            m.config.text_config.num_key_value_heads,
            int((text + kept[:, j]).sum()) + 3 * B,
        )
    padded_len = caches["padded"].layers[-1].keys.shape[2] * B
    assert caches["packed"].layers[-1].keys.shape[2] < padded_len  # the padding is gone


@pytest.mark.parametrize("variant", ["atp", "fixed"])
def test_packed_generate_equals_padded(variant):
    _, m = tiny_atp(**VARIANTS[variant])
    m.eval()
    inputs = prompt("left")
    gen = {}
    for layout in ("padded", "packed"):
        m.config.hard_layout = layout
        gen[layout] = m.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen["packed"], gen["padded"])
    assert gen["packed"].shape == (3, inputs["input_ids"].shape[1] + 6)


@pytest.mark.parametrize("q_lens,k_lens", [([5, 1, 7], [5, 1, 7]), ([1, 1, 1], [4, 9, 2]), ([2, 3], [6, 3])])
def test_varlen_attention_equals_padded_sdpa_per_sample(q_lens, k_lens):
    """Per sample: causal attention of its queries (the last keys of its sample) over its keys, GQA."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, d = 4, 2, 8
    q = torch.randn(1, H, sum(q_lens), d, generator=g)
    k, v = (torch.randn(1, Hkv, sum(k_lens), d, generator=g) for _ in range(2))
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    keys = PackedKeys(cu(q_lens), cu(k_lens), q_lens, k_lens)
    out = varlen_attention(q, k, v, keys, d**-0.5)
    sq = sk = 0
    for lq, lk in zip(q_lens, k_lens):
        qs, ks, vs = q[:, :, sq : sq + lq], k[:, :, sk : sk + lk], v[:, :, sk : sk + lk]
        ks, vs = ks.repeat_interleave(H // Hkv, 1), vs.repeat_interleave(H // Hkv, 1)
        s = qs @ ks.transpose(-1, -2) * d**-0.5
        causal = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        ref = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ vs
        torch.testing.assert_close(out[:, sq : sq + lq], ref.transpose(1, 2), atol=1e-6, rtol=0)
        sq, sk = sq + lq, sk + lk


def test_bad_layout_is_named():
    with pytest.raises(Exception, match="hard_layout=.ragged."):  # hub strict-dataclass error wrapping ValueError
        tiny_atp(hard_layout="ragged")


def test_the_pruning_clock_times_each_piece_of_pruning_work_and_changes_nothing():
    """`model.pruning_clock` (what pipeline/eval/bench.py reads instead of wrapping the model's
    methods): every pruning point's score request, scores, masks and gather are measured, in both
    layouts, and the forward's results are those of a run without it."""
    from model.pruning import PruningClock

    class Counting(PruningClock):
        entered = 0

        def measure(self):
            self.entered += 1
            return super().measure()

    _, m = tiny_atp()
    m.eval()
    inputs = prompt("left")
    ref = both(m, **inputs)
    m.pruning_clock = clock = Counting()
    out = both(m, **inputs)
    k = len(m.config.atp_layers)
    assert clock.entered == 2 * 4 * k  # 2 layouts x (request, scores, masks, gather) per pruning point
    assert clock.seconds > 0
    for a, b in zip(ref, out):
        assert torch.equal(a.logits, b.logits) and torch.equal(a.atp_info["keep"], b.atp_info["keep"])
    m.pruning_clock, seconds = None, clock.seconds
    both(m, **inputs)
    assert clock.seconds == seconds and clock.entered == 8 * k
