"""Model core: the properties training, inference and export rely on. Tiny, CPU, fp32."""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from model import (
    CACHE_KW,
    AtpLlavaConfig,
    AtpLlavaForConditionalGeneration,
    layer_flops_exact,
    layer_flops_paper,
    model_costs,
)
from model.attention import atp_attention
from model.budget import tokens_per_layer
from model.kernels import dense_bias
from model.scores import spatial_scores

from tiny_models import IMAGE_TOKEN, LV, make_batch, tiny_atp, tiny_llava_config

torch.set_grad_enabled(True)


def text_positions(batch):
    return batch["attention_mask"].bool() & (batch["input_ids"] != IMAGE_TOKEN)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_pruning_none_equals_source_llava(padding):
    llava, m = tiny_atp(pruning="none")
    b = make_batch([3, 6, 1], [4, 2, 5], answers=[2, 1, 3], padding=padding)
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    live = b["attention_mask"].bool()
    for mode in ("train", "eval"):
        llava.train(mode == "train")
        m.train(mode == "train")
        ref = llava(**b, position_ids=pos)
        out = m(**b)
        assert (ref.logits - out.logits)[live].abs().max() <= 1e-5, mode
        assert torch.allclose(ref.loss, out.loss, atol=1e-6)
        assert torch.equal(out.visual_tokens, torch.full((3, 6), float(LV)))


def test_config_fields_take_natural_types(tmp_path):
    """A token count or weight written as an int is what users type: every numeric field takes
    one (huggingface_hub's strict dataclass validation rejects an int for a bare `float`), keeps
    its float type, and survives a save / load."""
    from tiny_models import tiny_llava

    m = AtpLlavaForConditionalGeneration.from_llava(
        tiny_llava(),
        atp_layers=[1, 3],
        pruning="atp",
        target_tokens=6,
        lambda_atp=1,
        lambda_target=0,
        lambda_sample=3,
        mask_temperature=50,
        mask_eps=0,
    )
    c = m.config
    for name in ("target_tokens", "lambda_atp", "lambda_target", "lambda_sample", "mask_temperature", "mask_eps"):
        assert type(getattr(c, name)) is float, name
    c.save_pretrained(tmp_path)
    back = AtpLlavaConfig.from_pretrained(tmp_path)
    assert (back.target_tokens, back.atp_layers, back.lambda_atp) == (6.0, [1, 3], 1.0)


def spread_hard_forward(m):
    """A three-sample batch, m's theta_r heads spread so the samples keep different counts, and m's
    hard (eval) forward on it."""
    b = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], padding="left", seed=1)
    with torch.no_grad():
        for mod in m.atp_modules:
            mod.head_r.bias.fill_(0.0)
            mod.head_r.weight.normal_(std=2.0)
    m.eval()
    with torch.no_grad():
        return b, m(**b)


@pytest.mark.parametrize(
    "atp_layers,score_self,merge,features,mix",
    [
        ((2, 4), "attention", "none", (), "even"),
        ((0, 3), "attention", "none", (), "even"),  # a point before layer 0
        ((2, 4), "duplication", "none", (), "even"),
        ((2, 4), "attention", "nearest", (), "even"),
        ((0, 3), "duplication", "nearest", (), "even"),
        ((0, 3), "duplication", "nearest", ("query", "sorted"), "even"),  # METHOD sec 14
        ((0, 3), "duplication", "nearest", ("query", "sorted"), "question"),  # METHOD sec 17
    ],
)
@pytest.mark.parametrize("position_mode", ["preserve", "rope2d"])
def test_soft_path_with_binary_masks_equals_hard_path(position_mode, atp_layers, score_self, merge, features, mix):
    _, m = tiny_atp(
        position_mode=position_mode,
        atp_layers=atp_layers,
        score_self=score_self,
        merge=merge,
        threshold_features=list(features),
        score_mix=mix,
    )
    b, hard = spread_hard_forward(m)
    keep = hard.atp_info["keep"]
    assert len(set(keep[:, -1].sum(-1).tolist())) > 1, "test needs different kept counts per sample"
    assert 0 < keep[:, -1].sum() < keep.shape[0] * LV
    m.train()
    soft = m(**b, atp_masks=[keep[:, k] for k in range(keep.shape[1])])
    text = text_positions(b)
    assert (soft.logits - hard.logits)[text].abs().max() <= 1e-4
    assert torch.allclose(soft.visual_tokens, hard.visual_tokens)


@pytest.mark.parametrize("merge", ["none", "nearest"])
def test_straight_through_trains_on_the_hard_forward_and_reaches_the_thresholds(merge):
    """straight_through (METHOD sec 20): the training forward is the inference forward (the hard rule's
    tokens, the same logits and counts), and the answer loss alone still moves the thresholds through
    the soft masks' gradient."""
    kw = dict(atp_layers=(0, 3), score_self="duplication", merge=merge, lambda_atp=0.0, lambda_target=0.0)
    _, m = tiny_atp(straight_through=True, mask_temperature=5, **kw)
    b, hard = spread_hard_forward(m)
    assert len(set(hard.atp_info["keep"][:, -1].sum(-1).tolist())) > 1
    m.train()
    out = m(**b)
    text = text_positions(b)
    assert (out.logits - hard.logits)[text].abs().max() <= 1e-4
    assert torch.allclose(out.visual_tokens, hard.visual_tokens)
    out.loss.backward()  # L_ntp alone (the budget terms' lambdas are 0)
    assert all(mod.head_r.weight.grad.abs().sum() > 0 for mod in m.atp_modules)

    _, soft = tiny_atp(mask_temperature=5, **kw)  # without it the training forward is the soft one
    soft.load_state_dict(m.state_dict())
    soft.train()
    assert (soft(**b).logits - hard.logits)[text].abs().max() > 1e-3


def test_question_mix_sets_cross_share_of_redundancy_per_sample():
    """score_mix question (METHOD sec 17): S_redundant = S_self + a (S_cross - S_self) with a from the
    question; a = 1/2 is the paper's even mix (same logits), and a saturated share ranks by one score."""
    _, even = tiny_atp(atp_layers=(0, 3))
    _, mixed = tiny_atp(atp_layers=(0, 3), score_mix="question")
    mixed.load_state_dict(even.state_dict(), strict=False)
    b = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], padding="left", seed=1)
    for m in (even, mixed):
        m.eval()
    with torch.no_grad():
        for mod in mixed.atp_modules:
            mod.mix.weight.zero_()
            mod.mix.bias.zero_()
        torch.testing.assert_close(mixed(**b).logits, even(**b).logits)
        keeps = []
        for bias in (-30.0, 30.0):  # S_self alone, then S_cross alone
            for mod in mixed.atp_modules:
                mod.mix.bias.fill_(bias)
            keeps.append(mixed(**b).atp_info["keep"])
    assert not torch.equal(keeps[0], keeps[1])


def test_without_spatial_grids_only_the_redundancy_threshold_keeps_soft_or_hard():
    """spatial_strides [] drops the spatial branch: S_spatial is 0, so the hard rule never keeps by
    theta_s, and the soft mask must not either (sigmoid(-theta_s T) would keep every token a little
    when theta_s nears 0)."""
    _, m = tiny_atp(spatial_strides=[], mask_temperature=1e4)
    b = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], padding="left", seed=1)
    with torch.no_grad():
        for mod in m.atp_modules:
            mod.head_s.bias.fill_(-30.0)  # theta_s ~ 1e-13
            mod.head_r.bias.fill_(0.0)
    m.eval()
    with torch.no_grad():
        hard = m(**b)
        m.train()
        soft = m(**b)
    assert 0 < hard.visual_tokens[:, -1].sum() < LV * 3
    assert torch.allclose(soft.visual_tokens, hard.visual_tokens, atol=0.25)  # a token in the band


def test_spatial_branch_keeps_only_at_the_modules_named():
    """spatial_modules [0]: the grids keep tokens at the first module only; later modules keep by
    theta_r alone, hard or soft (soft == hard with the hard masks), whatever theta_s says."""
    _, m = tiny_atp(atp_layers=(0, 3), spatial_modules=[0], mask_temperature=1e4)  # a narrow soft band
    b = make_batch([2, 5, 3], [6, 3, 4], answers=[2, 2, 1], padding="left", seed=1)
    with torch.no_grad():
        for mod in m.atp_modules:
            mod.head_s.bias.fill_(-30.0)  # theta_s ~ 0: every grid token passes where the grids count
            mod.head_r.bias.fill_(0.0)
    m.eval()
    with torch.no_grad():
        hard = m(**b)
    by_spatial = (hard.atp_info["branch"] >= 2).sum(-1)  # [B, K] tokens above theta_s
    assert (by_spatial[:, 0] > 0).all() and (by_spatial[:, 1] == 0).all()
    keep = hard.atp_info["keep"]
    assert 0 < keep[:, 1].sum() < keep[:, 0].sum()
    m.train()
    soft = m(**b, atp_masks=[keep[:, k] for k in range(keep.shape[1])])
    assert (soft.logits - hard.logits)[text_positions(b)].abs().max() <= 1e-4
    with torch.no_grad():
        free = m(**b)  # soft masks of their own: the second module's grids add nothing either
    assert torch.allclose(free.visual_tokens, hard.visual_tokens, atol=0.25)  # a token in the band
    with pytest.raises(Exception, match="spatial_modules"):
        tiny_atp(atp_layers=(0, 3), spatial_modules=[2])


@pytest.mark.parametrize("atp_layers", [(3, 5), (0, 5)])
def test_blockwise_scores_equal_full_attention_map(atp_layers):
    """Module 0's scores equal those of the full attention map of layer i_0 - 1, or of layer 0 on
    the input embeddings when i_0 = 0 (METHOD sec 10)."""
    llava, m = tiny_atp(atp_layers=atp_layers)
    b = make_batch([4, 2], [5, 3], answers=[2, 2], padding="left", seed=2)
    captured = {}
    step = m._atp_step

    def spy(k, scores, *args):
        captured.setdefault(k, scores)
        return step(k, scores, *args)

    m._atp_step = spy
    m.eval()
    with torch.no_grad():
        m(**b)
    # reference: the full L x L logits of layer max(i_0 - 1, 0) and its eager attention probabilities
    llava.set_attn_implementation("eager")
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = llava(**b, position_ids=pos, output_hidden_states=True, output_attentions=True)
    j = max(atp_layers[0] - 1, 0)
    layer = llava.model.language_model.layers[j]
    h = layer.input_layernorm(ref.hidden_states[j])
    attn = layer.self_attn
    B, L, _ = h.shape
    q = attn.q_proj(h).view(B, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, -1, attn.head_dim).transpose(1, 2)
    cos, sin = llava.model.language_model.rotary_emb(h, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, 1)
    logits = (q @ k.transpose(-1, -2) * attn.scaling).mean(1)  # full [B, L, L]
    probs = ref.attentions[j].mean(1)
    ids = b["input_ids"]
    for bi in range(B):
        vis = torch.nonzero(ids[bi] == IMAGE_TOKEN).flatten()
        after = torch.arange(L) > vis[-1]
        first_ans = torch.nonzero(b["labels"][bi] != -100).flatten()[0]
        query = torch.nonzero(after & (torch.arange(L) < first_ans)).flatten()
        block = logits[bi][vis][:, vis]
        tri = torch.ones(LV, LV).tril()
        s_self = (block * tri).sum(0) / tri.sum(0)
        s_cross = probs[bi][query][:, vis].mean(0)
        got_self, got_cross = captured[0]
        assert (got_self[bi] - s_self).abs().max() <= 1e-5
        assert (got_cross[bi] - s_cross).abs().max() <= 1e-5


def _weights_in_sequence(w, vis_index, L):
    """[B, L]: each visual token's weight w [B, Lv] at its position in the sequence, 0 for text and
    padding (gone slots point at 0 with weight 0), as the score request carries it (`seq_weight`)."""
    return torch.zeros(w.shape[0], L, dtype=w.dtype).scatter_add_(1, vis_index, w)


def test_received_logits_after_pruning_equal_the_visual_block_of_the_logits():
    """S_self at a later pruning point (METHOD sec 1): tokens already gone carry weight 0 and sit at
    slot 0 of the sequence; kept ones are weighted by their soft mask. The sequence-order reverse
    cumsum equals the explicit weighted mean over the causal visual block of the head-mean logits."""
    from model.scores import _received_logits

    g = torch.Generator().manual_seed(3)
    B, H, L, d, Lv = 2, 3, 11, 4, 8
    q, k = torch.randn(B, H, L, d, generator=g), torch.randn(B, H, L, d, generator=g)
    vis_index = torch.zeros(B, Lv, dtype=torch.long)
    w = torch.zeros(B, Lv)
    kept = [torch.tensor([0, 2, 3, 5, 7]), torch.tensor([1, 2, 4, 5, 6, 7])]
    for b, slots in enumerate(kept):  # text before and after the image; gone slots read index 0
        vis_index[b, slots] = torch.arange(3, 3 + len(slots)) - b
        w[b, slots] = torch.rand(len(slots), generator=g) * 0.9 + 0.1
    got = _received_logits(q, k, 0.5, vis_index, _weights_in_sequence(w, vis_index, L))
    logits = (q @ k.transpose(-1, -2)).mean(1) * 0.5  # [B, L, L]
    for b, slots in enumerate(kept):
        for j, n in enumerate(slots):
            later = slots[j:]  # causal: the visual queries at or after n
            rows, wm = vis_index[b, later], w[b, later]
            ref = (wm * logits[b, rows, vis_index[b, n]]).sum() / wm.sum()
            assert (got[b, n] - ref).abs() <= 1e-5


def test_duplication_score_ranks_a_unique_token_above_copies():
    """METHOD sec 11: among value vectors where most are near-copies, the odd one out scores
    highest, and a token already pruned (weight 0) does not count as a copy."""
    from model.scores import _distinctness

    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 2, 1, 8, generator=g)
    value = base.expand(1, 2, 6, 8) + 0.01 * torch.randn(1, 2, 6, 8, generator=g)
    value = value.clone()
    value[0, :, 3] = torch.randn(2, 8, generator=g)  # token 3 is unlike the rest
    vis_index = torch.arange(6)[None]
    s = _distinctness(value, vis_index, torch.ones(1, 6))
    assert s.argmax().item() == 3
    # pruned tokens (weight 0) are no one's copies: among the live 0, 1 and 3, the copies 0 and 1
    # score alike and token 3 highest, as if the others never existed
    w = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]])
    s = _distinctness(value, vis_index, w)[0]
    live = _distinctness(value[:, :, [0, 1, 3]], torch.arange(3)[None], torch.ones(1, 3))[0]
    assert s[3] > s[0] and s[0].item() == pytest.approx(s[1].item(), abs=0.05)
    assert torch.allclose(s[[0, 1, 3]], live, atol=1e-6)
    # the explicit form: minus the weighted mean over the other live tokens of the cosine similarity
    # (gone slots read sequence index 0, weight 0; text in the sequence around the image)
    v = torch.randn(2, 3, 9, 4, generator=g)
    vis_index = torch.zeros(2, 6, dtype=torch.long)
    w = torch.zeros(2, 6)
    for b, slots in enumerate([torch.tensor([0, 1, 3, 5]), torch.tensor([1, 2, 4, 5])]):
        vis_index[b, slots] = torch.arange(2, 2 + len(slots))
        w[b, slots] = torch.rand(len(slots), generator=g) * 0.9 + 0.1
    got = _distinctness(v, vis_index, _weights_in_sequence(w, vis_index, 9))
    flat = torch.nn.functional.normalize(v.transpose(1, 2).flatten(2), dim=-1)  # [B, 9, 3 * 4]
    for b in range(2):
        for n in torch.nonzero(w[b]).flatten():
            others = [m for m in torch.nonzero(w[b]).flatten() if m != n]
            sims = torch.stack([flat[b, vis_index[b, n]] @ flat[b, vis_index[b, m]] for m in others])
            wm = w[b, others]
            assert got[b, n].item() == pytest.approx(-(wm * sims).sum().item() / wm.sum().item(), abs=1e-5)


@pytest.mark.parametrize(
    "atp_layers,merge,features,mix",
    [
        ((2, 4), "none", (), "even"),
        ((0, 3), "none", (), "even"),
        ((2, 4), "nearest", (), "even"),
        ((0, 3), "none", ("query", "sorted"), "even"),
        ((2, 4), "none", (), "question"),  # the learned mix alone: its question input without the feature
    ],
)
def test_gradient_reaches_thresholds_through_masked_layers(atp_layers, merge, features, mix):
    # budget terms off: the gradient must come through the masked attention (and merging) alone
    _, m = tiny_atp(
        lambda_atp=0.0,
        lambda_target=0.0,
        atp_layers=atp_layers,
        merge=merge,
        threshold_features=list(features),
        score_mix=mix,
    )
    m.train()
    b = make_batch([3, 2], [4, 5], answers=[3, 2], seed=3)
    out = m(**b)
    out.loss.backward()
    for k, mod in enumerate(m.atp_modules):
        for name in ("head_r", "head_s", "fc", *features, *(["mix"] if mix == "question" else [])):
            g = getattr(mod, name).weight.grad
            assert g is not None and g.abs().sum() > 0, (k, name)
    # the first module's mask enters at least two masked layers behind it
    assert m.config.text_config.num_hidden_layers - m.config.atp_layers[0] >= 2


def test_per_module_budget_loss_pulls_each_module_to_its_count():
    """budget_loss=per_module: L_target = sum_k span_k / N |kept_k - c_k| / Lv with c from
    counts_for_budget (kept_k: the soft counts, which carry the thresholds' gradient)."""
    from model.budget import counts_for_budget, group_spans

    _, m = tiny_atp(budget_loss="per_module", lambda_atp=0.0)
    with torch.no_grad():  # module 0 keeps nearly all, module 1 nearly none: errors of both signs
        for mod, bias in zip(m.atp_modules, (-6.0, 6.0)):
            mod.head_r.bias.fill_(bias)
            mod.head_s.bias.fill_(bias)
    m.train()
    b = make_batch([3, 2], [4, 5], answers=[3, 2], seed=3)
    out = m(**b)
    cfg = m.config
    n = cfg.text_config.num_hidden_layers
    counts = counts_for_budget(cfg.atp_layers, n, LV, cfg.target_tokens / LV)
    kept = out.visual_tokens[:, cfg.atp_layers].mean(0)
    spans = group_spans(cfg.atp_layers, n)[1:]
    want = sum(s / n * abs(k - c) for s, k, c in zip(spans, kept.tolist(), counts)) / LV
    assert out.atp_losses["target"].item() == pytest.approx(want, rel=1e-5)
    n_bar_loss = abs(out.visual_tokens.mean().item() - cfg.target_tokens) / LV
    assert abs(want - n_bar_loss) > 1e-3  # not the paper's |N_bar - target| under another name


def test_dual_budget_prices_follow_each_module_error():
    """budget_loss=dual (METHOD sec 15): L_target = sum_k p_k span_k / N (kept_k - c_k) / Lv, a price
    per token that rises while module k keeps more than c_k and falls (not below 0) while it keeps fewer."""
    from model.budget import counts_for_budget, group_spans

    _, m = tiny_atp(budget_loss="dual", lambda_atp=0.0, dual_lr=0.5)
    with torch.no_grad():  # module 0 keeps nearly all, module 1 nearly none
        for mod, bias in zip(m.atp_modules, (-6.0, 6.0)):
            mod.head_r.bias.fill_(bias)
            mod.head_s.bias.fill_(bias)
    m.train()
    b = make_batch([3, 2], [4, 5], answers=[3, 2], seed=3)
    cfg = m.config
    n = cfg.text_config.num_hidden_layers
    counts = counts_for_budget(cfg.atp_layers, n, LV, cfg.target_tokens / LV)
    spans = group_spans(cfg.atp_layers, n)[1:]
    out = m(**b)
    kept = out.visual_tokens[:, cfg.atp_layers].mean(0).tolist()
    assert kept[0] > counts[0] and kept[1] < counts[1]
    price = [1 + 0.5 * (k - c) / c for k, c in zip(kept, counts)]
    assert m._price.tolist() == pytest.approx([price[0], max(price[1], 0.0)], rel=1e-5)
    want = sum(max(p, 0) * s / n * (k - c) for p, s, k, c in zip(price, spans, kept, counts)) / LV
    assert out.atp_losses["target"].item() == pytest.approx(want, rel=1e-4)
    first = m._price.clone()
    m(**b)  # a second training step (no optimizer step: the same counts) moves each price again
    step = torch.tensor([0.5 * (k - c) / c for k, c in zip(kept, counts)])
    assert torch.allclose(m._price, (first + step).clamp_min(0), atol=1e-5)
    after_train = m._price.clone()
    m.eval()
    with torch.no_grad():
        m(**b)
    assert torch.equal(m._price, after_train)  # inference never moves the prices


@pytest.mark.parametrize("signal", ["loss", "answer"])
def test_marginal_value_moves_each_sample_count_by_its_score_at_two_budgets(signal):
    """marginal_weight (METHOD sec 16): each sample's value is its answer score at (1 + span) x the
    schedule minus at (1 - span) x, per unit of N_bar share between them, both under the fixed
    ranking (score: minus the mean answer loss, or the probability of the whole answer);
    L_marginal = -mean(a_i share_i) with a the standardised values, so the gradient raises the count
    of samples that gain more from tokens. The inner passes leave the config as it was
    and do not move the dual prices."""
    from model.budget import module_counts
    from model.modeling_atp_llava import per_sample_ntp

    _, m = tiny_atp(budget_loss="dual", lambda_atp=0.0, marginal_weight=1.0, marginal_span=0.5, marginal_signal=signal)
    m.train()
    b = make_batch([3, 2, 4], [4, 5, 2], answers=[3, 2, 4], seed=5)
    cfg = m.config
    out = m(**b)
    assert cfg.pruning == "atp" and cfg.fixed_counts is None  # restored after the inner passes

    def score_at(scale):
        fixed = [min(LV, max(1, round(c * scale))) for c in module_counts(cfg)]
        _, ref = tiny_atp(pruning="fixed", fixed_counts=fixed)
        ref.load_state_dict(m.state_dict())
        ref.train()
        with torch.no_grad():
            o = ref(**b)
        share = o.visual_tokens.mean(1) / LV
        if signal == "loss":
            return -per_sample_ntp(o.logits, b["labels"]), share
        logp = torch.log_softmax(o.logits[:, :-1].double(), -1)  # the answer's probability, token by token
        target = b["labels"][:, 1:]
        picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0] * (target != -100)
        return picked.sum(1).exp(), share

    (high, s_high), (low, s_low) = score_at(1.5), score_at(0.5)
    v = (high - low) / (s_high - s_low)  # per unit of N_bar share
    a = (v - v.mean()) / (v.std(unbiased=False) + 1e-6)
    share = out.visual_tokens.mean(1) / LV
    want = -(a * share).mean()
    assert out.atp_losses["marginal"].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)

    m.zero_grad()
    want.backward()  # the term alone: its gradient reaches the threshold heads
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.atp_modules.parameters())
    assert a.argmax() != a.argmin()  # the values differ, so the term pulls counts apart

    _, plain = tiny_atp(budget_loss="dual", lambda_atp=0.0)
    plain.load_state_dict(m.state_dict())
    plain.train()
    base = plain(**b)
    assert out.loss.item() - base.loss.item() == pytest.approx(out.atp_losses["marginal"].item(), abs=1e-5)


def test_marginal_value_around_each_sample_own_counts():
    """marginal_center own (METHOD sec 16): the two budgets are each sample's own kept counts of the
    forward x (1 -/+ span), per module, under the fixed ranking, so its value is the slope of its
    answer score where its thresholds stand (sample j's score: the batch pruned at j's counts)."""
    from model.modeling_atp_llava import per_sample_ntp

    _, m = tiny_atp(budget_loss="dual", lambda_atp=0.0, marginal_weight=1.0, marginal_center="own")
    m.train()
    b = make_batch([3, 2, 4], [4, 5, 2], answers=[3, 2, 4], seed=5)
    out = m(**b)
    own = out.atp_info["keep"].sum(-1)  # [B, K] each sample's count after each module
    _, ref = tiny_atp(pruning="fixed", fixed_counts=[1] * len(m.config.atp_layers))
    ref.load_state_dict(m.state_dict())
    ref.train()

    def score_at(scale):
        counts = (own * scale).round().clamp(1, LV).long()
        scores, shares = [], []
        with torch.no_grad():
            for j in range(counts.shape[0]):
                ref.config.fixed_counts = counts[j].tolist()
                o = ref(**b)
                scores.append(-per_sample_ntp(o.logits, b["labels"])[j])
                shares.append(o.visual_tokens[j].mean() / LV)
        return torch.stack(scores), torch.stack(shares)

    (high, s_high), (low, s_low) = score_at(1.5), score_at(0.5)
    v = (high - low) / (s_high - s_low)
    assert len(set(s_high.tolist())) > 1  # the samples' budgets differ: each is its own
    a = (v - v.mean()) / (v.std(unbiased=False) + 1e-6)
    want = -(a * out.visual_tokens.mean(1) / LV).mean()
    assert out.atp_losses["marginal"].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)


def test_marginal_rank_own_prices_the_tokens_the_model_keeps():
    """marginal_rank own (METHOD sec 16): the value passes keep each sample's top tokens by the model's
    own keep rule, so a pass at the model's own hard counts keeps exactly the tokens its hard path
    keeps (the fixed ranking, top S_red, keeps others), and training with it still moves the thresholds."""
    _, m = tiny_atp(budget_loss="dual", lambda_atp=0.0, marginal_weight=1.0, marginal_center="own", marginal_rank="own")
    for mod in m.atp_modules:  # a low theta_s: the spatial branch keeps grid tokens S_red ranks low
        torch.nn.init.constant_(mod.head_s.bias, -2.0)
    b = make_batch([3, 2, 4], [4, 5, 2], answers=[3, 2, 4], seed=5)
    m.eval()
    with torch.no_grad():
        keep = m(**b).atp_info["keep"]  # [B, K, Lv] what the hard rule keeps
    counts = [c for c in keep.sum(-1).T]  # [K] of [B]
    assert len(set(counts[0].tolist())) > 1  # the samples' counts differ
    own = m._fixed_pass(b, counts, rank="own").atp_info["keep"]
    assert torch.equal(own, keep)
    assert not torch.equal(m._fixed_pass(b, counts).atp_info["keep"], keep)  # the fixed ranking differs

    # in training the term is priced on those tokens: it differs from the fixed ranking's
    _, fixed_rank = tiny_atp(budget_loss="dual", lambda_atp=0.0, marginal_weight=1.0, marginal_center="own")
    fixed_rank.load_state_dict(m.state_dict())
    m.train(), fixed_rank.train()
    terms = [model(**b).atp_losses["marginal"].item() for model in (m, fixed_rank)]
    assert terms[0] != 0 and terms[0] != pytest.approx(terms[1], abs=1e-4)


@pytest.mark.parametrize("share", ["all", "redundancy"])
def test_marginal_share_redundancy_moves_only_the_redundancy_threshold(share):
    """marginal_share redundancy (METHOD sec 16): L_marginal prices only the tokens theta_r keeps
    (given what earlier modules kept, detached), so its gradient reaches head_r and never head_s;
    with `all` (every kept token) it reaches both."""
    _, m = tiny_atp(budget_loss="dual", lambda_atp=0.0, marginal_weight=1.0, marginal_share=share, mask_temperature=5)
    m.train()
    b = make_batch([3, 2, 4], [4, 5, 2], answers=[3, 2, 4], seed=5)
    _, plain = tiny_atp(budget_loss="dual", lambda_atp=0.0, mask_temperature=5)
    plain.load_state_dict(m.state_dict())
    plain.train()
    for model in (m, plain):
        model.zero_grad()
        model(**b).loss.backward()

    def marginal_grad(head):  # L_marginal's own gradient: with the term minus without it
        return sum(
            (getattr(a, head).weight.grad - getattr(p, head).weight.grad).abs().sum()
            for a, p in zip(m.atp_modules, plain.atp_modules)
        )

    assert marginal_grad("head_r") > 1e-6
    assert (marginal_grad("head_s") < 1e-9) == (share == "redundancy")


def test_branch_value_weighs_the_spatial_ranking_against_the_redundancy_one():
    """branch_weight (METHOD sec 18): each sample's value is its answer score with its own counts kept
    grid first (the spatial branch's ranking, coarsest grid first) minus kept by S_red, sample j's score
    from the batch pruned at j's counts; L_branch = mean_i(a_i mean_k(theta_s - theta_r)) with a the
    standardised values, so the branch that serves a sample better gets the lower threshold."""
    from model.modeling_atp_llava import per_sample_ntp

    _, m = tiny_atp(budget_loss="dual", lambda_atp=0.0, branch_weight=1.0)
    m.train()
    b = make_batch([3, 2, 4], [4, 5, 2], answers=[3, 2, 4], seed=5)
    out = m(**b)
    assert m.config.pruning == "atp" and getattr(m, "_sample_rank", None) is None  # restored
    own = out.atp_info["keep"].sum(-1).round().clamp(1, LV).long()  # [B, K]
    _, ref = tiny_atp(pruning="fixed", fixed_counts=[1] * len(m.config.atp_layers))
    ref.load_state_dict(m.state_dict())
    ref.train()
    grid = m.spatial_score(out.logits)  # [Lv] the spatial score of each token

    def score(rank):
        scores = []
        with torch.no_grad():
            for j in range(own.shape[0]):
                ref.config.fixed_counts, ref._sample_rank = own[j].tolist(), rank
                o = ref(**b)
                scores.append(-per_sample_ntp(o.logits, b["labels"])[j])
                if rank == "spatial":  # the first module keeps the highest grid scores
                    kept = o.atp_info["keep"][j, 0] > 0.5
                    assert int(kept.sum()) == own[j, 0]
                    assert grid[kept].min() >= grid[~kept].max()
        ref._sample_rank = None
        return torch.stack(scores)

    u = score("spatial") - score("redundancy")
    assert u.abs().max() > 0
    a = (u - u.mean()) / (u.std(unbiased=False) + 1e-6)
    th = out.atp_info["thresholds"]
    want = (a * (th[..., 1] - th[..., 0]).mean(1)).mean()
    assert out.atp_losses["branch"].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)

    _, plain = tiny_atp(budget_loss="dual", lambda_atp=0.0)
    plain.load_state_dict(m.state_dict())
    plain.train()
    base = plain(**b)
    assert out.loss.item() - base.loss.item() == pytest.approx(out.atp_losses["branch"].item(), abs=1e-5)
    m.zero_grad()
    (out.loss - base.loss.detach()).backward()  # the term's gradient reaches both threshold heads
    for head in ("head_r", "head_s"):
        assert any(getattr(mod, head).bias.grad.abs().sum() > 0 for mod in m.atp_modules)


@pytest.mark.parametrize("kw", [dict(branch_weight=-1.0), dict(branch_weight=1.0, spatial_strides=[])])
def test_branch_value_needs_a_spatial_branch(kw):
    with pytest.raises(Exception, match="branch_weight"):
        tiny_atp(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        dict(marginal_weight=1.0),
        dict(marginal_weight=1.0, budget_loss="dual", marginal_span=1.0),
        dict(marginal_weight=1.0, budget_loss="dual", marginal_signal="accuracy"),
        dict(marginal_weight=1.0, budget_loss="dual", marginal_center="mine"),
        dict(marginal_weight=1.0, budget_loss="dual", marginal_rank="mine"),
    ],
)
def test_marginal_value_needs_a_schedule_and_a_span_below_one(kw):
    with pytest.raises(Exception, match="marginal"):  # hub strict-dataclass error wrapping ValueError
        tiny_atp(**kw)


def test_merge_averages_each_dropped_token_into_the_kept_token_most_like_it():
    from model.pruning import merge_dropped

    e1, e2 = torch.eye(3)[:2]
    h = torch.stack([e1, e2, 2 * e1, e2 + 0.1 * e1])[None]  # 0, 1 kept; 2 is like 0, 3 like 1
    kept = torch.tensor([[1.0, 1.0, 0.0, 0.0]], requires_grad=True)
    dropped = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    out = merge_dropped(h, kept, dropped, temperature=50.0)[0]
    assert torch.allclose(out[0], 1.5 * e1, atol=1e-3)
    assert torch.allclose(out[1], (2 * e2 + 0.1 * e1) / 2, atol=1e-3)
    assert torch.equal(out[2:], h[0, 2:])  # not kept: unchanged (the hard path drops them)
    assert torch.equal(merge_dropped(h, kept, torch.zeros_like(dropped), 50.0), h)  # nothing dropped
    # the soft masks get a gradient through the mixing (so the thresholds do)
    soft = merge_dropped(h, kept, torch.tensor([[0.0, 0.0, 0.7, 0.4]]), 5.0)
    soft[0, 0].sum().backward()
    assert kept.grad.abs().sum() > 0


def test_masked_attention_gradcheck_wrt_mask():
    cfg = tiny_llava_config().text_config
    cfg._attn_implementation = "sdpa"
    module = LlamaAttention(cfg, layer_idx=0).double()
    torch.manual_seed(0)
    B, H, Hkv, L, d = 2, 4, 2, 6, 16
    q = torch.randn(B, H, L, d, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, d, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, d, dtype=torch.float64)
    live = torch.ones(B, L, dtype=torch.bool)
    mask = torch.rand(B, L, dtype=torch.float64).clamp(0.05, 0.95).requires_grad_()

    def f(m):
        bias = dense_bias(live, torch.log(m), torch.float64)
        return atp_attention(module, q, k, v, bias, scaling=d**-0.5)[0]

    assert torch.autograd.gradcheck(f, (mask,), eps=1e-6, atol=1e-5)


def test_generate_matches_uncached_pruned_recompute_and_cache_is_pruned():
    _, m = tiny_atp()
    m.eval()
    b = make_batch([3, 5], [4, 2], padding="left", seed=4)
    prompt = {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    gen = m.generate(**prompt, max_new_tokens=6, do_sample=False)
    new = gen[:, b["input_ids"].shape[1] :]
    # the instruction is the prompt's text after the image; generated tokens never join it
    L0 = b["input_ids"].shape[1]
    qmask = m._query_mask(
        type("S", (), {"live": b["attention_mask"].bool(), "vis": torch.where(b["input_ids"] == IMAGE_TOKEN, 0, -1)})(),
        torch.ones(2, dtype=torch.bool),
        None,
        None,
    )
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        for t in range(new.shape[1]):
            qm = torch.cat([qmask, torch.zeros(2, ids.shape[1] - L0, dtype=torch.bool)], 1)
            logits = m(input_ids=ids, attention_mask=mask, pixel_values=b["pixel_values"], query_mask=qm).logits
            nxt = logits[:, -1].argmax(-1)
            assert torch.equal(nxt, new[:, t]), t
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    # after prefill, each layer's cache holds the text and the kept visual tokens only
    cache = DynamicCache(config=m.config.get_text_config())
    with torch.no_grad():
        out = m(**prompt, **{CACHE_KW: cache}, use_cache=True)
    text = text_positions(b).sum(1)
    state = cache.atp_state
    for j in range(m.config.text_config.num_hidden_layers):
        g = state["group_of_layer"][j]
        kept = out.visual_tokens[:, j].long()
        live = state["group_live"][g]
        assert torch.equal(live.sum(1), text + kept), j
        assert cache.layers[j].keys.shape[-2] == live.shape[1]
    assert out.visual_tokens[:, -1].max() < LV
    # decoding continues from the unpruned length
    assert torch.equal(state["next_pos"], b["attention_mask"].sum(1))
    sampled = m.generate(**prompt, max_new_tokens=4, do_sample=True, top_k=5)
    assert sampled.shape == (2, L0 + 4)


def test_method_sec7_nbar_and_eq15_flops():
    counts = [torch.tensor([576.0]), torch.tensor([126.0]), torch.tensor([88.0]), torch.tensor([20.0])]
    per_layer = tokens_per_layer(counts, [4, 14, 24], 32)
    assert per_layer.shape == (1, 32)
    assert round(per_layer.mean().item(), 1) == 143.9
    L, d, m = 640, 4096, 11008
    assert layer_flops_paper(L, d, m) == 4 * 640 * 4096**2 + 2 * 640**2 * 4096 + 2 * 640 * 4096 * 11008
    # exact count, GQA 32 heads / 8 kv heads x 128, SwiGLU: q,o: 2*L*d*4096 each; k,v: 2*L*d*1024 each
    exact = 2 * L * d * (4096 + 4096 + 1024 + 1024) + 4 * L * L * 4096 + 6 * L * d * m
    assert layer_flops_exact(L, d, m, 32, 8, 128) == exact
    cfg = AtpLlavaConfig(
        text_config=dict(
            model_type="llama",
            hidden_size=d,
            intermediate_size=m,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
        ),
        atp_layers=[4, 14, 24],
    )
    full = model_costs([576] * 32, 64, cfg)
    pruned = model_costs(per_layer[0].tolist(), 64, cfg)
    assert full["flops_paper"] == 32 * layer_flops_paper(640, d, m)
    assert pruned["kv_cache_bytes"] / full["kv_cache_bytes"] == pytest.approx((143.875 + 64) / 640)
    assert 0 < pruned["atp_flops"] < 0.02 * pruned["flops_paper"]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kept", ["all", "none", "learned"])
def test_edge_cases_finite(batch, kept):
    _, m = tiny_atp()
    b = make_batch([2 + i for i in range(batch)], [3] * batch, answers=[2] * batch, seed=5)
    masks = None
    if kept != "learned":
        fill = 1.0 if kept == "all" else 0.0
        masks = [torch.full((batch, LV), fill)] * len(m.config.atp_layers)
    for mode in (True, False):
        m.train(mode)
        out = m(**b, atp_masks=masks)
        assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
        if kept == "none":
            assert out.visual_tokens[:, m.config.atp_layers[0] :].sum() == 0
        if kept == "all":
            assert (out.visual_tokens == LV).all()
    m.eval()
    gen = m.generate(
        **{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}, max_new_tokens=2, atp_masks=masks
    )
    assert gen.shape[0] == batch


def test_text_only_samples_mix_with_image_samples():
    _, m = tiny_atp()
    b = make_batch([3, 4, 2], [3, 3, 3], answers=[2, 2, 2], seed=6, text_only=(1,))
    for mode in (True, False):
        m.train(mode)
        out = m(**b)
        assert torch.isfinite(out.loss)
        assert (out.visual_tokens[1] == 0).all() and (out.visual_tokens[0, 0] == LV)


def test_fixed_pruning_keeps_the_given_counts():
    _, m = tiny_atp(pruning="fixed", fixed_counts=[10, 4])
    b = make_batch([3, 5], [4, 2], answers=[1, 1], seed=7)
    for mode in (True, False):
        m.train(mode)
        out = m(**b)
        assert out.visual_tokens[:, 2:4].eq(10).all() and out.visual_tokens[:, 4:].eq(4).all()


def test_bad_inputs_name_the_problem():
    _, m = tiny_atp()
    b = make_batch([3], [4], seed=8)
    with pytest.raises(ValueError, match="pixel_values"):
        m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    with pytest.raises(ValueError, match="image tokens"):
        m(input_ids=b["input_ids"][:, 1:] * (b["input_ids"][:, 1:] != IMAGE_TOKEN), pixel_values=b["pixel_values"])
    with pytest.raises(ValueError, match=f"{LV - 1} image tokens"):
        ids = b["input_ids"].clone()
        ids[0, torch.nonzero(ids[0] == IMAGE_TOKEN)[0]] = 5
        m(input_ids=ids, pixel_values=b["pixel_values"])
    for layers in ([4, 2], [-1, 3], [2, 6]):
        with pytest.raises(Exception, match="atp_layers"):  # hub strict-dataclass error wrapping ValueError
            AtpLlavaConfig(text_config=dict(model_type="llama", num_hidden_layers=6), atp_layers=layers)


def test_spatial_score_grids_follow_method_sec2():
    s = spatial_scores(24, [2, 3, 4, 6, 8, 12], 3.0).view(24, 24)
    # centred offsets: stride 12 -> 5, 4 -> 1, 3 -> 1, 2 -> 0; a token takes its sparsest grid's value
    assert s[5, 5] == pytest.approx(1 - 3 * 4 / 576)
    assert s[1, 1] == pytest.approx(1 - 3 * 36 / 576)  # in the stride-3 and stride-4 grids
    assert s[4, 4] == pytest.approx(1 - 3 * 64 / 576)  # stride 3 only
    assert s[0, 0] == pytest.approx(1 - 3 * 144 / 576)  # stride 2 only
    assert s[0, 1] == 0.0  # in no grid


def test_from_llava_path_and_save_load_roundtrip(tmp_path):
    llava, m = tiny_atp()
    llava.save_pretrained(tmp_path / "llava")
    m2 = AtpLlavaForConditionalGeneration.from_llava(
        str(tmp_path / "llava"), atp_layers=[2, 4], threshold_hidden=32, spatial_strides=[2, 3], target_tokens=LV * 0.5
    )
    m.save_pretrained(tmp_path / "atp")
    m3 = AtpLlavaForConditionalGeneration.from_pretrained(tmp_path / "atp").eval()
    b = make_batch([2], [3], seed=9)
    m.eval(), m2.eval()
    with torch.no_grad():
        a, c = m(**b), m3(**b)
        m2(**b)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.visual_tokens, c.visual_tokens)


def test_from_original_llava_parts(tmp_path):
    """LLaVA-1.5's own layout: a Llama dir with its tokenizer, a CLIP dir, mm_projector.bin in LLaVA's key names."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from pipeline.data.tokenizer import build_word_tokenizer

    cfg = tiny_llava_config()
    tok = build_word_tokenizer(["red", "blue"])
    torch.manual_seed(0)
    text = cfg.text_config.to_dict()
    text["vocab_size"] = len(tok)
    from transformers import LlamaConfig

    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text.items() if k not in ("model_type",)}))
    llama.save_pretrained(tmp_path / "vicuna")
    tok.save_pretrained(tmp_path / "vicuna")
    clip = CLIPVisionModel(cfg.vision_config)
    clip.save_pretrained(tmp_path / "clip")
    d_v, d_t = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    proj = {
        "model.mm_projector.0.weight": torch.randn(d_t, d_v),
        "model.mm_projector.0.bias": torch.randn(d_t),
        "model.mm_projector.2.weight": torch.randn(d_t, d_t),
        "model.mm_projector.2.bias": torch.randn(d_t),
    }
    torch.save(proj, tmp_path / "mm_projector.bin")

    m = AtpLlavaForConditionalGeneration.from_parts(
        tmp_path / "vicuna",
        tmp_path / "clip",
        tmp_path / "mm_projector.bin",
        atp_layers=[2, 4],
        spatial_strides=[2, 3],
        threshold_hidden=32,
    )
    x = torch.randn(3, d_v)
    want = torch.nn.functional.gelu(x @ proj["model.mm_projector.0.weight"].T + proj["model.mm_projector.0.bias"])
    want = want @ proj["model.mm_projector.2.weight"].T + proj["model.mm_projector.2.bias"]
    assert torch.allclose(m.model.multi_modal_projector(x), want, atol=1e-5)
    assert torch.equal(
        m.model.language_model.embed_tokens.weight[: len(tok)], llama.model.embed_tokens.weight[: len(tok)]
    )
    assert m.config.num_visual_tokens == LV
    assert m.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    with pytest.raises(FileNotFoundError, match="mm_projector"):
        AtpLlavaForConditionalGeneration.from_parts(tmp_path / "vicuna", tmp_path / "clip", tmp_path / "nope.bin")
