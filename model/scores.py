"""Token scores of METHOD sec 1-2: redundancy (self + cross attention) and spatial grids.

The redundancy scores need attention logits for two blocks only, visual x visual and
query-text x all keys, recomputed from the q/k of layer i_k - 1 inside its attention call
(`attention.py`), so the main attention never materialises an L x L probability map and
SDPA / flash kernels stay usable. Scores are features for the threshold MLP: they are
computed without gradient (the gradient reaches the thresholds through the masks).
"""

from __future__ import annotations

import torch


def spatial_scores(grid: int, strides, lambda_sample: float) -> torch.Tensor:
    """S_spatial [grid*grid] (METHOD sec 2): the best (1 - lambda * rate) of the centred grids holding a token."""
    # explicit CPU: transformers may build the model under a meta-device context
    score = torch.zeros(grid, grid, device="cpu")
    idx = torch.arange(grid, device="cpu")
    for s in strides:
        if s >= grid:
            continue
        offset = (grid - 1 - (grid - 1) // s * s) // 2
        on = (idx % s) == offset
        cells = on[:, None] & on[None, :]
        rate = cells.sum().item() / grid**2
        value = 1.0 - lambda_sample * rate
        if value > 0:  # grids denser than 1/lambda never count
            score = torch.where(cells, torch.clamp(score, min=value), score)
    return score.flatten()


def minmax(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row over its live entries to [0, 1]; dead entries become 0."""
    big = torch.finfo(x.dtype).max
    lo = torch.where(live, x, big).amin(-1, keepdim=True)
    hi = torch.where(live, x, -big).amax(-1, keepdim=True)
    out = (x - lo) / (hi - lo).clamp_min(1e-6)
    return torch.where(live, out.clamp(0, 1), torch.zeros_like(out))


@torch.no_grad()
def redundancy_scores(
    query,
    key,
    bias,
    scaling,
    vis_index,
    vis_weight,
    q_index,
    q_valid,
    value=None,
    *,
    seq_weight,
    self_score="attention",
):
    """Block-wise S_self and S_cross (METHOD sec 1), each [B, Lv], not yet normalised.

    query [B, H, L, d] and key [B, Hkv, Lk, d] are the layer's post-rotary states (Lk == L at
    prefill); bias [B, 1, Q, Lk] is the additive mask the layer's attention uses (causal, padding
    and log of the cumulative soft mask) on the query-text rows q_index only (`attention.py`).
    vis_index [B, Lv] gives each original visual token's index in the current sequence,
    vis_weight [B, Lv] its cumulative mask (0 for tokens already gone; the training-free computes read
    it), seq_weight [B, L] the same at each token's position in the sequence (0 for text and padding:
    what both S_self forms read); q_index / q_valid [B, Q] the query-text rows. self_score
    "duplication" replaces S_self by how unlike the other live visual tokens a token's value vector
    is (METHOD sec 11; value [B, Hkv, Lk, d], needed then).
    """
    rep = query.shape[1] // key.shape[1]
    query, key = query.float(), key.float()
    if rep > 1:  # GQA: each query head reads its kv head
        key = key.repeat_interleave(rep, dim=1)
    w_seq = seq_weight.float()
    if self_score == "duplication":
        s_self = _distinctness(value, vis_index, w_seq)
    else:
        s_self = _received_logits(query, key, scaling, vis_index, w_seq)
    # S_cross[n]: mean over valid query-text rows (and heads) of the masked softmax probability on key n
    probs = _row_probs(query, key, bias, scaling, q_index)  # [B, H, Q, Lk]
    H = probs.shape[1]
    row_w = (q_valid.float() / (H * q_valid.sum(1, keepdim=True).clamp_min(1))).repeat(1, H)  # [B, H * Q]
    s_cross = torch.matmul(row_w[:, None], probs.flatten(1, 2))[:, 0]  # [B, Lk]: one product, no [B, Q, Lk] mean
    return s_self, s_cross.gather(1, vis_index)


def _received_logits(query, key, scaling, vis_index, w_seq):
    """The paper's S_self [B, Lv]: mean over causal visual queries m >= n, weighted by the queries'
    masks, of the head-mean logit q_m.k_n. The sum over m of w_m q_m.k_n is k_n . (sum_{m >= n} w_m q_m):
    a reverse cumulative sum of the weighted queries, O(L H d) instead of the Lv x Lv logits. It runs
    in the sequence's own order (w_seq: a visual token's weight at its position, 0 for text and padding), so
    q / k are read in place, not gathered and transposed to the Lv slots: after the first pruning
    point the sequence is shorter than Lv. The slots of tokens already gone read garbage (their
    scores are masked by the caller)."""
    H = query.shape[1]
    tail = (query * w_seq[:, None, :, None]).flip(2).cumsum(2).flip(2)  # [B, H, L, d]: sum over m >= n
    num = (key * tail).sum((1, 3))  # k_n . tail_n, summed over heads
    den = w_seq.flip(1).cumsum(1).flip(1)
    return (num * (scaling / H) / den.clamp_min(1e-6)).gather(1, vis_index)


def _distinctness(value, vis_index, w_seq):
    """[B, Lv]: minus the mean cosine similarity of each visual token's value vector (heads
    concatenated; values carry no rotary position) to the other live visual tokens, weighted by
    their cumulative mask (w_seq, at their positions in the sequence). Large plain regions are many
    near-copies and score low.
    The weighted sum over the others of v_n . v_m (unit vectors) is v_n . (sum_m w_m v_m) minus its own
    term w_n: O(L D), no Lv x Lv similarity matrix; in the sequence's order, like `_received_logits`."""
    v = value.float()
    sq = v.pow(2).sum((1, 3))  # [B, L] squared norms, heads concatenated
    norm = sq.sqrt().clamp_min(1e-12)
    v = v / norm[:, None, :, None]
    total = (v * w_seq[:, None, :, None]).sum(2, keepdim=True)  # [B, Hkv, 1, d]
    own = sq / norm.square()  # v_n . v_n: 1, or 0 for a zero vector
    others = (v * total).sum((1, 3)) - w_seq * own
    weight = w_seq.sum(1, keepdim=True) - w_seq
    return (-others / weight.clamp_min(1e-6)).gather(1, vis_index)


def _row_probs(query, key, bias, scaling, q_index):
    """Softmax probabilities [B, H, Q, Lk] of the rows q_index under the layer's own mask (bias: those
    rows, [B, 1, Q, Lk]). query [B, H, L, d] and key [B, H, Lk, d] float, kv heads already repeated."""
    B, H, _, d = query.shape
    qt = query.gather(2, q_index[:, None, :, None].expand(B, H, -1, d))
    return torch.softmax(torch.matmul(qt, key.transpose(-1, -2)) * scaling + bias.float(), dim=-1)


@torch.no_grad()
def visual_attention(query, key, bias, scaling, vis_index, vis_weight, q_index, q_valid, value=None, seq_weight=None):
    """[B, Q, Lv]: the head-mean attention probability from each query row to each original visual
    token, as the layer computes it (0 for tokens already gone and for invalid rows). A drop-in
    `ScoreRequest.compute` for training-free baselines (FastV, SparseVLM) that rank visual tokens
    by the attention text gives them; same arguments as `redundancy_scores`."""
    B, H = query.shape[:2]
    query, key = query.float(), key.float()
    if H // key.shape[1] > 1:
        key = key.repeat_interleave(H // key.shape[1], dim=1)
    probs = _row_probs(query, key, bias, scaling, q_index).mean(1)
    probs = probs.gather(2, vis_index[:, None, :].expand(B, probs.shape[1], -1))
    return probs * (vis_weight > 0)[:, None, :] * q_valid[:, :, None]
