"""The pruning interface of the decoder loop (`modeling_atp_llava.py`): what decides, at each
pruning point, which visual tokens stay.

A pruning point i sits before decoder layer i (0 = before the first layer). A pruner has

- `layers`: its pruning points, strictly increasing;
- `request(k, flow)`: the `attention.ScoreRequest` that decoder layer layers[k] - 1 fills from
  its own attention for point k (None: nothing);
- `select(k, flow, request)`: masks M [B, Lv] over the original visual positions (the loop
  multiplies them into the cumulative mask C) and optionally new features [B, Lv, D] for the kept
  tokens (merging: a policy's on the hard path, ATP's `merge` on both), or None;
- `info(keeps)`: what `AtpLlavaOutput.atp_info` reports.

What follows a pruning point (C, counts, the gather, keys, rope, KV groups) is the loop's, in one
place (`AtpLlavaForConditionalGeneration._prune`), whoever selected the tokens.

`PruningClock`: the model's measurement point for that work (`model.pruning_clock`), so a
benchmark reads the pruning share of a forward without wrapping the model's methods.

This file is copied into exported checkpoints (trust_remote_code): relative imports only.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from .scores import redundancy_scores


class PruningClock:
    """Host wall time of a forward's pruning work, in `seconds`: the score request, the scores
    the layer before a pruning point computes in its attention, the thresholds and masks
    (`_atp_step`) and the gather. Set `model.pruning_clock = PruningClock()` (None: nothing is
    measured); pipeline/eval/bench.py reports it as the ATP share of a prefill. On CUDA it counts
    launch time, not kernel time, unless the caller synchronises."""

    def __init__(self):
        self.seconds = 0.0

    @contextlib.contextmanager
    def measure(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t


def timed(method):
    """A model method whose wall time goes into `self.pruning_clock` when one is set."""

    @functools.wraps(method)
    def inner(self, *args, **kwargs):
        clock = self.pruning_clock
        if clock is None:
            return method(self, *args, **kwargs)
        with clock.measure():
            return method(self, *args, **kwargs)

    return inner


@dataclass
class PruneContext:
    """What a training-free pruning policy sees before decoder layer `layer` (original Lv positions)."""

    model: object
    layer: int
    live: torch.Tensor  # [B, Lv] bool: visual tokens still in the sequence (False for text-only samples)
    hidden: torch.Tensor  # [B, Lv, D] their hidden states entering `layer` (garbage where not live)
    embeds: torch.Tensor  # [B, L, D] the decoder's input embeddings, caller's layout
    vis_orig: torch.Tensor  # [B, Lv] where each visual token sits in the caller's layout (0 for text-only samples)
    has_img: torch.Tensor  # [B] bool
    attention: torch.Tensor | None = None  # what `policy.attention_compute` returned for layer - 1
    q_orig: torch.Tensor | None = None  # [B, Q] its query rows, as indices into the caller's input_ids
    q_valid: torch.Tensor | None = None  # [B, Q] bool


class AtpPruning:
    """The ATP modules (METHOD sec 3-5): soft masks in train mode, hard ones in eval mode."""

    def __init__(self, model, has_img, atp_masks, hard):
        self.model, self.has_img, self.atp_masks, self.hard = model, has_img, atp_masks, hard
        self.layers = list(model.config.atp_layers)
        self.thresholds, self.m_sums, self.branches = [], [], []
        self.red_sums = []  # soft path: per module, [B] tokens its redundancy branch keeps (METHOD sec 16)
        self_score = model.config.score_self  # what the layer before each module computes (None: the default)
        self.compute = (
            None if self_score == "attention" else functools.partial(redundancy_scores, self_score=self_score)
        )

    def request(self, k, flow):
        return self.model._score_request(flow, compute=self.compute)

    def select(self, k, flow, request):
        override = None if self.atp_masks is None else self.atp_masks[k]
        query = (
            question_state(flow.padded_hidden(), flow.qmask)
            if "query" in self.model.config.threshold_features or self.model.config.score_mix == "question"
            else None
        )
        M, theta, branch = self.model._atp_step(k, request.result, flow.C, self.has_img, override, self.hard, query)
        self.thresholds.append(theta)
        self.m_sums.append(M.sum(-1))
        if branch is not None and self.hard:
            self.branches.append(branch)
        elif branch is not None:  # soft: [B, Lv, 2] the two branches' masks; C detached, so only m_r moves
            self.red_sums.append((flow.C.detach() * branch[..., 0]).sum(-1))
        cfg = self.model.config
        if cfg.merge == "none":
            return M, None
        vis_index, _ = self.model._visual_slots(flow.seq, flow.C.shape[1])
        hidden = flow.padded_hidden()
        hidden = hidden.gather(1, vis_index[..., None].expand(-1, -1, hidden.shape[-1]))
        kept = flow.C * M
        return M, merge_dropped(hidden, kept, flow.C - kept, cfg.merge_temperature)

    def info(self, keeps):
        out = {"thresholds": torch.stack(self.thresholds, 1).detach(), "keep": torch.stack(keeps, 1).detach()}
        if self.branches:  # hard ATP: which branch kept each token ([B, K, Lv] int8: 1 redundancy only,
            # 2 spatial only, 3 both), from the tokens above each threshold (`_atp_step`), once for all modules
            above = torch.stack(self.branches, 1).to(torch.int8)
            out["branch"] = above[..., 0] + 2 * above[..., 1]
        return out


def question_state(hidden, qmask):
    """[B, D]: the mean hidden state of the query tokens (METHOD sec 1's question) entering the pruning
    point, RMS-normalised so its scale does not depend on the layer; gradient-free like the scores.
    Rows without query tokens (text-only samples) are 0."""
    h = hidden.detach().float()
    w = qmask.float()[..., None]
    mean = (h * w).sum(1) / w.sum(1).clamp_min(1.0)
    return mean * torch.rsqrt(mean.pow(2).mean(-1, keepdim=True) + 1e-6)


def merge_dropped(hidden, kept, dropped, temperature):
    """METHOD sec 12: what a pruning point drops is averaged into the kept tokens most like it.

    hidden [B, Lv, D] at the original positions; kept = C after the point, dropped = C before minus
    C after ([B, Lv]; soft in training, 0/1 at inference). Token j's dropped mass goes to kept token
    i in proportion to kept_i exp(T (cos(h_i, h_j) - 1)); kept token i becomes
    (h_i + sum_j dropped_j a_ij h_j) / (1 + sum_j dropped_j a_ij). One formula for both paths, so
    binary soft masks give the hard path's features; the similarity is gradient-free, the mixing
    carries gradients to h and to the masks (so to the thresholds)."""
    h = hidden.float()
    unit = torch.nn.functional.normalize(h.detach(), dim=-1)
    affinity = kept.float()[:, :, None] * torch.exp(temperature * (unit @ unit.transpose(1, 2) - 1))  # [B, i, j]
    share = affinity / affinity.sum(1, keepdim=True).clamp_min(1e-12)  # each dropped j spreads over kept i
    give = share * dropped.float()[:, None, :]
    return (h + give @ h) / (1 + give.sum(-1, keepdim=True))


class PolicyPruning:
    """A training-free policy (`baselines.py`, eval only) on ATP's hard path."""

    m_sums = ()  # no L_ATP term

    def __init__(self, model, policy, flow, embeds, has_img):
        lv, n_layers = model.config.num_visual_tokens, model.config.text_config.num_hidden_layers
        self.layers = list(policy.layers)
        made_for = (getattr(policy, "lv", lv), getattr(policy, "num_layers", n_layers))
        if made_for != (lv, n_layers) or any(not 0 <= i < n_layers for i in self.layers):
            raise ValueError(
                f"pruning_policy {getattr(policy, 'name', policy)!r} was made for another model "
                f"(Lv {getattr(policy, 'lv', '?')}, {getattr(policy, 'num_layers', '?')} layers, pruning at "
                f"{self.layers}); this one has Lv {lv} and {n_layers} layers"
            )
        self.model, self.policy, self.embeds, self.has_img = model, policy, embeds, has_img
        self.vis_orig = model._visual_slots(flow.seq, lv)[0]

    def request(self, k, flow):
        compute = self.policy.attention_compute(self.layers[k])
        return None if compute is None else self.model._score_request(flow, compute=compute)

    @torch.no_grad()
    def select(self, k, flow, request):
        vis_index, present = self.model._visual_slots(flow.seq, flow.C.shape[1])
        hidden = flow.padded_hidden()
        D = hidden.shape[-1]
        live = (flow.C > 0.5) & present & self.has_img[:, None]
        ctx = PruneContext(
            model=self.model,
            layer=self.layers[k],
            live=live,
            hidden=hidden.gather(1, vis_index[..., None].expand(-1, -1, D)),
            embeds=self.embeds,
            vis_orig=self.vis_orig,
            has_img=self.has_img,
            attention=None if request is None else request.result,
            q_orig=None if request is None else flow.seq.orig.gather(1, request.q_index),
            q_valid=None if request is None else request.q_valid,
        )
        keep, features = self.policy.select(ctx)
        return (keep.bool() & live).to(flow.C.dtype), features

    def info(self, keeps):
        return {"keep": torch.stack(keeps, 1).detach(), "policy": self.policy.name}
