"""AtpLlavaConfig: a LlavaConfig plus the ATP fields of docs/METHOD.md.

Every choice the paper leaves open is a field here with METHOD's default, so training,
inference and export read one object. This file is copied into exported checkpoints
(trust_remote_code), so it imports only transformers (and huggingface_hub's strict dataclass,
which transformers' configs use) and atp_values.py beside it.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from .atp_values import check as check_atp_values

PRUNING_MODES = ("none", "atp", "fixed")
POSITION_MODES = ("preserve", "rope2d")
SCORE_NORMS = ("minmax", "none")
SELF_SCORES = ("attention", "duplication")  # METHOD sec 11
SCORE_MIXES = ("even", "question")  # METHOD sec 1, 17
MERGE_MODES = ("none", "nearest")  # METHOD sec 12
BUDGET_LOSSES = ("n_bar", "per_module", "dual")  # METHOD sec 7, 13, 15
MARGINAL_SIGNALS = ("loss", "answer")  # METHOD sec 16
MARGINAL_CENTERS = ("schedule", "own")  # METHOD sec 16
MARGINAL_SHARES = ("all", "redundancy")  # METHOD sec 16
MARGINAL_RANKS = ("fixed", "own")  # METHOD sec 16
THRESHOLD_FEATURES = ("query", "sorted")  # METHOD sec 14
ATTN_KERNELS = ("sdpa", "flash", "flex", "channel", "auto")  # model/kernels.py, docs/GPU.md
HARD_LAYOUTS = ("padded", "packed")  # model/packed.py


# Float fields are annotated `int | float` and cast below: huggingface_hub's strict validation
# (2.x) rejects an int for a `float` field, and `target_tokens=36` is what users write.
FLOAT_FIELDS = (
    "mask_temperature",
    "lambda_sample",
    "lambda_atp",
    "lambda_target",
    "target_tokens",
    "mask_eps",
    "merge_temperature",
    "dual_lr",
    "marginal_weight",
    "marginal_span",
    "branch_weight",
)


@strict
class AtpLlavaConfig(LlavaConfig):
    model_type = "atp_llava"

    atp_layers: list[int] | tuple[int, ...] = (4, 14, 24)
    pruning: str = "atp"  # none | atp | fixed
    spatial_strides: list[int] | tuple[int, ...] = (2, 3, 4, 6, 8, 12)
    # the modules (0-based, in atp_layers' order) whose spatial branch keeps tokens; None: every module
    spatial_modules: list[int] | tuple[int, ...] | None = None
    mask_temperature: int | float = 50.0
    lambda_sample: int | float = 3.0
    lambda_atp: int | float = 0.05
    lambda_target: int | float = 0.2
    target_tokens: int | float = 144.0
    position_mode: str = "preserve"  # preserve | rope2d
    score_norm: str = "minmax"  # minmax | none
    score_self: str = "attention"  # attention (the paper's S_self) | duplication (METHOD sec 11)
    # even: S_redundant = (S_self + S_cross) / 2 (the paper) | question: S_cross's share learned per question
    score_mix: str = "even"
    merge: str = "none"  # none (the paper) | nearest: dropped tokens averaged into kept ones (METHOD sec 12)
    merge_temperature: int | float = 20.0
    budget_loss: str = (
        "n_bar"  # n_bar: |N_bar - target| (the paper) | per_module: each module to its Table-2-shaped count
    )
    dual_lr: int | float = 1.0  # budget_loss=dual: how fast the per-module token price follows the error
    # METHOD sec 16: each sample's marginal value of tokens (its loss at two fixed budgets) moves its
    # count; 0 = off (the paper)
    marginal_weight: int | float = 0.0
    marginal_span: int | float = 0.5  # the two budgets: (1 -/+ span) x each module's count
    marginal_signal: str = "loss"  # loss: answer loss | answer: probability of the whole answer
    # the two budgets around the schedule's counts, or around each sample's own counts of the forward
    marginal_center: str = "schedule"
    # the share the value moves: every kept token, or only those the redundancy branch keeps
    marginal_share: str = "all"
    # the tokens the two budgets keep: the fixed method's (top S_red) or the model's own keep rule's
    marginal_rank: str = "fixed"
    # METHOD sec 18: each sample's loss under the spatial branch's ranking against the redundancy
    # ranking's, at its own counts, moves its two thresholds apart; 0 = off (the paper)
    branch_weight: int | float = 0.0
    threshold_hidden: int = 256
    threshold_features: list[str] | tuple[str, ...] = ()  # METHOD sec 14: query | sorted, beside the scores
    fixed_counts: list[int] | tuple[int, ...] | None = None
    mask_eps: int | float = 1e-6
    # METHOD sec 20: training forwards the hard keep rule's 0 / 1 masks (what inference keeps) and
    # backpropagates the soft masks' gradient
    straight_through: bool = False
    attn_kernel: str = "sdpa"  # sdpa | flash | flex | channel | auto (docs/GPU.md)
    # eval (hard) batches: padded to the longest sample after each pruning point (the reference) or
    # packed, [sum of lengths, D] with variable-length attention and a per-sample KV cache (packed.py)
    hard_layout: str = "padded"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.atp_layers = [int(i) for i in self.atp_layers]
        self.spatial_strides = [int(s) for s in self.spatial_strides]
        for name in FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        if self.fixed_counts is not None:
            self.fixed_counts = [int(c) for c in self.fixed_counts]
        self.threshold_features = [str(f) for f in self.threshold_features]

    # -- derived quantities ---------------------------------------------------------
    @property
    def grid_size(self) -> int:
        vc = self.vision_config
        return vc.image_size // vc.patch_size

    @property
    def num_visual_tokens(self) -> int:
        """Lv: image tokens per image at the LLM input ("default" strategy drops CLS)."""
        extra = 0 if self.vision_feature_select_strategy == "default" else 1
        return self.grid_size**2 + extra

    def validate_atp(self):
        """Fail early, naming the field, on settings the model cannot honour."""
        n_layers = self.text_config.num_hidden_layers
        layers = self.atp_layers
        if self.pruning not in PRUNING_MODES:
            raise ValueError(f"pruning={self.pruning!r}: expected one of {PRUNING_MODES}")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode={self.position_mode!r}: expected one of {POSITION_MODES}")
        if self.score_norm not in SCORE_NORMS:
            raise ValueError(f"score_norm={self.score_norm!r}: expected one of {SCORE_NORMS}")
        if self.score_self not in SELF_SCORES:
            raise ValueError(f"score_self={self.score_self!r}: expected one of {SELF_SCORES}")
        if self.score_mix not in SCORE_MIXES:
            raise ValueError(f"score_mix={self.score_mix!r}: expected one of {SCORE_MIXES}")
        if self.budget_loss not in BUDGET_LOSSES:
            raise ValueError(f"budget_loss={self.budget_loss!r}: expected one of {BUDGET_LOSSES}")
        bad = [f for f in self.threshold_features if f not in THRESHOLD_FEATURES]
        if bad or len(set(self.threshold_features)) != len(self.threshold_features):
            raise ValueError(
                f"threshold_features={self.threshold_features}: expected distinct names from {THRESHOLD_FEATURES}"
            )
        if self.marginal_signal not in MARGINAL_SIGNALS:
            raise ValueError(f"marginal_signal={self.marginal_signal!r}: expected one of {MARGINAL_SIGNALS}")
        if self.marginal_center not in MARGINAL_CENTERS:
            raise ValueError(f"marginal_center={self.marginal_center!r}: expected one of {MARGINAL_CENTERS}")
        if self.marginal_share not in MARGINAL_SHARES:
            raise ValueError(f"marginal_share={self.marginal_share!r}: expected one of {MARGINAL_SHARES}")
        if self.marginal_rank not in MARGINAL_RANKS:
            raise ValueError(f"marginal_rank={self.marginal_rank!r}: expected one of {MARGINAL_RANKS}")
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge={self.merge!r}: expected one of {MERGE_MODES}")
        if self.attn_kernel not in ATTN_KERNELS:
            raise ValueError(
                f"attn_kernel={self.attn_kernel!r}: expected one of {ATTN_KERNELS} "
                "(flash needs `pip install '.[gpu]'`; auto picks what is installed)"
            )
        if self.hard_layout not in HARD_LAYOUTS:
            raise ValueError(f"hard_layout={self.hard_layout!r}: expected one of {HARD_LAYOUTS}")
        check_atp_values(  # the rules shared with the pipeline
            layers,
            n_layers,
            self.pruning,
            self.fixed_counts,
            budget_loss=self.budget_loss,
            marginal_weight=self.marginal_weight,
            marginal_span=self.marginal_span,
            branch_weight=self.branch_weight,
            spatial_strides=self.spatial_strides,
            spatial_modules=self.spatial_modules,
        )
        if self.vision_feature_select_strategy == "full" and self.position_mode == "rope2d":
            raise ValueError(
                "position_mode='rope2d' needs a square token grid (vision_feature_select_strategy='default')"
            )
