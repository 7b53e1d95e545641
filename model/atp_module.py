"""The ATP module (METHOD sec 3): a tiny MLP that predicts two thresholds per image.

Its input is the paper's, [S_redundant, S_spatial] at the original Lv positions, plus optional
features (`threshold_features`, METHOD sec 14) that let the thresholds follow the question and
the image's content: `query`, the question's pooled hidden state at the pruning point, and
`sorted`, S_redundant sorted (a position-free picture of how many tokens stand out).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init


class AtpModule(nn.Module):
    """x = [S_redundant, S_spatial] at the original Lv positions -> (theta_r, theta_s), each in (0, 1)."""

    def __init__(self, num_visual_tokens: int, hidden: int, features=(), text_hidden: int = 0, mix: bool = False):
        super().__init__()
        # score_mix question (METHOD sec 17): S_cross's share of S_redundant, from the question alone
        self.mix = nn.Linear(text_hidden, 1) if mix else None
        self.fc = nn.Linear(2 * num_visual_tokens, hidden)
        # extra inputs add into the hidden layer (no bias: fc has one)
        self.query = nn.Linear(text_hidden, hidden, bias=False) if "query" in features else None
        self.sorted = nn.Linear(num_visual_tokens, hidden, bias=False) if "sorted" in features else None
        self.act = nn.GELU()
        self.head_r = nn.Linear(hidden, 1)
        self.head_s = nn.Linear(hidden, 1)

    def init_thresholds(self, theta_r: float, theta_s: float, std: float = 0.01):
        """Start near given thresholds (so the first steps keep about the target share) with small
        head weights, so the thresholds depend on the input from the first gradient step on."""
        # transformers' guarded init: a no-op on weights already loaded from a checkpoint
        init.normal_(self.fc.weight, std=0.02)
        init.zeros_(self.fc.bias)
        for extra in (self.query, self.sorted):
            if extra is not None:
                init.normal_(extra.weight, std=0.02)
        if self.mix is not None:  # share 1/2 at the start: the paper's even mix
            init.normal_(self.mix.weight, std=0.02)
            init.zeros_(self.mix.bias)
        for head, theta in ((self.head_r, theta_r), (self.head_s, theta_s)):
            init.normal_(head.weight, std=std)
            init.constant_(head.bias, math.log(theta / (1 - theta)))

    def cross_share(self, query: torch.Tensor) -> torch.Tensor | None:
        """[B] in (0, 1): how much of S_redundant is S_cross for this question (None: the even mix)."""
        if self.mix is None:
            return None
        return torch.sigmoid(self.mix(query.to(self.mix.weight.dtype))).squeeze(-1)

    def forward(self, s_red: torch.Tensor, s_spa: torch.Tensor, query: torch.Tensor | None = None):
        """query: [B, D] the question's pooled hidden state (needed with the `query` feature)."""
        dtype = self.fc.weight.dtype
        h = self.fc(torch.cat([s_red, s_spa], dim=-1).to(dtype))
        if self.sorted is not None:
            h = h + self.sorted(s_red.sort(-1, descending=True).values.to(dtype))
        if self.query is not None:
            h = h + self.query(query.to(dtype))
        z = self.act(h)
        return torch.sigmoid(self.head_r(z)).squeeze(-1), torch.sigmoid(self.head_s(z)).squeeze(-1)


def hard_keep(s_red, s_spa, theta_r, theta_s, live):
    """The hard (inference) keep rule, METHOD sec 5: a live token stays when its redundancy score
    exceeds theta_r or its spatial score exceeds theta_s. Scores and `live` [B, Lv]; thresholds
    broadcast against them ([B, 1], or a number). Returns the two branches [B, Lv] bool; the kept
    tokens are `red | spa`. The decoder loop (`_atp_step`) and the threshold calibration
    (calibration.py) both prune by it."""
    return (s_red > theta_r) & live, (s_spa > theta_s) & live


def keep_margin(s_red, s_spa, theta_r, theta_s):
    """How far each token stands above the hard rule's bar: max(S_red - theta_r, S_spatial - theta_s),
    a token in no grid (S_spatial 0) with no spatial margin. Positive exactly where `hard_keep` keeps
    a live token (theta_s > 0), so ranking by it and keeping a sample's hard count gives its hard tokens
    (METHOD sec 16's `marginal_rank: own`). Same shapes as `hard_keep`; margins lie in (-1, 1) on
    min-max scores, below -1 outside the grids."""
    return torch.maximum(s_red - theta_r, torch.where(s_spa > 0, s_spa - theta_s, -2.0))
