"""One evaluation record: a method at a budget, as report.json's `records` hold it.

`report.record` makes one from a method's measurements, `evaluate.Evaluator` adds the sft
retention, the eval time and the interleaved times; `report.summary`, `report.markdown`,
`plots` and `stages.base.base_goals` read it. `Record.to_json` is the report.json entry,
`Record.from_json` reads one back (older files included).

The JSON keys are the field names, in field order. A field without a default is always
written (null when None); an optional one only when set, so keys that a record lacks (no
reference, no scene, no timing) stay absent rather than null.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import NotRequired, TypedDict

from pipeline.eval.timing import RatioStats, SpreadStats


class BatchTiming(TypedDict):
    """Times at one batch size, every method interleaved (pipeline/eval/timing.py)."""

    prefill: SpreadStats  # seconds
    decode_per_token: SpreadStats  # seconds per decoded token
    prefill_ratio: NotRequired[RatioStats]  # to `unpruned`'s; absent without an unpruned record
    decode_ratio: NotRequired[RatioStats]


class NBarSpread(TypedDict):
    """How N_bar spreads over the images (pipeline/eval/diagnostics.py)."""

    std: float
    p10: float
    p90: float


def _written_with(other: str):
    """An optional field that is written (null when None) whenever field `other` is: None then
    means "not defined" (e.g. retention against a reference that scored 0), not "not measured"."""
    return field(default=None, metadata={"written_with": other})


@dataclass(kw_only=True)  # kw_only: fields with defaults may precede ones without, to keep the JSON order
class Record:
    """One method at one budget: its accuracy, kept tokens, costs and times."""

    # -- what was run
    method: str  # pipeline/eval/methods.py's names
    budget: float | None  # the target share of Lv (N_bar / Lv, METHOD sec 7); None: an unpruned reference
    budget_tokens: float | None  # budget x Lv
    # -- accuracy (exact match, pipeline/eval/answers.py)
    accuracy: float
    accuracy_by_family: dict[str, float]  # family (coarse, fine) -> accuracy
    accuracy_by_qtype: dict[str, float]  # question type -> accuracy
    # -- visual tokens kept
    n_bar: float | None  # mean over decoder layers of the visual tokens each attends; None: no image samples
    n_bar_share: float | None  # n_bar / Lv
    tokens_per_layer: list[float]  # visual tokens attended by each decoder layer, mean over samples
    tokens_per_layer_by_family: dict[str, list[float] | None]
    kept_at_atp_layers_by_family: dict[str, list[float]]  # after each ATP module: the adaptivity claim
    # -- analytic costs (model/cost.py)
    flops_paper: float
    flops_exact: float
    kv_cache_bytes: float
    atp_flops: float  # of the ATP modules alone
    # -- where the kept tokens sit (pipeline/eval/diagnostics.py, whose summary() gives these fields)
    n_bar_by_qtype: dict[str, float | None] | None = None
    n_bar_spread: NBarSpread | None = None  # over the images
    rank_corr_n_bar_shapes: float | None = _written_with("n_bar_spread")  # Spearman, image N_bar vs its small shapes
    # samples with a scene only: the share of object (small-shape) tokens reaching the last layer,
    # and after each pruning point; the share of the last layer's kept tokens that cover no shape
    object_recall: float | None = None
    object_recall_per_point: list[float] | None = None
    small_recall: float | None = None
    small_recall_per_point: list[float] | None = None
    background_share: float | None = None
    object_tokens_per_image: float | None = None
    kept_by_branch: dict[str, list[float]] | None = None  # ATP's hard path: per module, by the branch keeping them
    # -- the run
    samples: int  # eval samples
    describe: dict  # the method's own description (model/baselines.py `describe()`, trained configs)
    # -- against the `unpruned` reference (absent for the reference itself)
    retention: float | None = _written_with("retention_by_family")  # accuracy / unpruned's; None when that is 0
    retention_by_family: dict[str, float | None] | None = None
    flops_paper_ratio: float | None = None  # each ratio: only when the reference's value is nonzero
    flops_exact_ratio: float | None = None
    kv_cache_bytes_ratio: float | None = None
    retention_vs_sft: float | None = None  # accuracy / `unpruned-sft`'s, when that ran and scored above 0
    eval_seconds: float | None = None  # answering and scoring, without the timing
    # -- times (Evaluator.time_all): by batch size (str, as JSON keys), then flat milliseconds at the
    # timing batch and, when that is not 1, at batch 1 (`_b1`); ratios to `unpruned`, not for itself
    timing: dict[str, BatchTiming] | None = None
    prefill_ms_b1: float | None = None
    decode_ms_per_token_b1: float | None = None
    prefill_ms_ratio_b1: float | None = None
    decode_ms_per_token_ratio_b1: float | None = None
    prefill_ms: float | None = None
    decode_ms_per_token: float | None = None
    prefill_ms_ratio: float | None = None
    decode_ms_per_token_ratio: float | None = None
    # keys this schema does not know (older report.json files had timing_batch and timing_repeats per
    # record), kept so that a file read and written again is unchanged; written last
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The report.json entry (see the module docstring for which keys are written)."""
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value, partner = getattr(self, f.name), f.metadata.get("written_with")
            if value is not None or f.default is MISSING or (partner and getattr(self, partner) is not None):
                out[f.name] = value
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, entry: dict) -> Record:
        """A record from a report.json entry; a key missing that every record has raises TypeError."""
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in entry.items() if k in known},
            extra={k: v for k, v in entry.items() if k not in known},
        )
