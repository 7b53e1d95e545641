"""The comparison methods of the evaluation: the one registry of their names and kinds, and the
one rule for which eval budget a trained checkpoint stands for.

- references (run unpruned): `unpruned` (the model before sft) and `SFT_REFERENCE` (the
  unpruned model after the same sft recipe, `variants` trains it);
- trained (`TRAINED`): exported checkpoints, run with their own pruning (`variants` trains one
  per budget; ATP at the main run's own budget is the run's `export`);
- policies: model/baselines.py's `POLICIES`, training-free, applied to the unpruned model.

`pipeline.core.config.Method` (the config's closed choice, torch-free) is this registry's
`ALL_METHODS` written out; importing this module fails when the two differ.
"""

from __future__ import annotations

from typing import get_args

from model.baselines import POLICIES
from pipeline.core.config import Method

UNPRUNED = "unpruned"
SFT_REFERENCE = "unpruned-sft"
TRAINED = ("atp", "fixed")
ALL_METHODS = TRAINED + POLICIES
# a trained checkpoint stands for the eval budget nearest its own share of Lv when that is this close
BUDGET_TOLERANCE = 0.005

if get_args(Method) != ALL_METHODS:
    raise ImportError(f"pipeline.core.config.Method {get_args(Method)} != the registry's {ALL_METHODS}")


def kind(method: str) -> str:
    """ "reference", "trained" or "policy"."""
    if method in (UNPRUNED, SFT_REFERENCE):
        return "reference"
    if method in TRAINED:
        return "trained"
    if method in POLICIES:
        return "policy"
    raise ValueError(f"unknown method {method!r}; known: {[UNPRUNED, SFT_REFERENCE, *ALL_METHODS]}")


def variant_name(method: str, budget: float) -> str:
    """The `variants` stage's directory name of a trained method at a budget (atp-15, fixed-11)."""
    return f"{method}-{round(budget * 100)}"


def trained_share(config) -> float:
    """The share of Lv (N_bar / Lv, METHOD sec 7) a trained model is for: atp its target, fixed
    its counts' N_bar."""
    if config.pruning == "atp":
        return config.target_tokens / config.num_visual_tokens
    if config.pruning == "fixed":
        from model.budget import n_bar

        lv = config.num_visual_tokens
        return n_bar(config.atp_layers, config.fixed_counts, config.text_config.num_hidden_layers, lv) / lv
    raise ValueError(f"pruning={config.pruning!r} is not a trained method ({TRAINED})")


def match_budget(share: float, budgets) -> float | None:
    """The budget of `budgets` nearest `share`, or None when none lies within BUDGET_TOLERANCE."""
    if not budgets:
        return None
    near = min(budgets, key=lambda b: abs(b - share))
    return near if abs(near - share) < BUDGET_TOLERANCE else None
