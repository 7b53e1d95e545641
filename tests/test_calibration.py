"""model/calibration.py: the thresholds start at the target share measured on a batch."""

import torch

from model.budget import keep_share_per_module
from model.calibration import calibrate_thresholds
from tests.tiny_models import LV, make_batch, tiny_atp


def _kept(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return out.atp_info["keep"].sum(-1), out.visual_tokens.mean(1)  # [B, K], [B]


def _thresholds(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).atp_info["thresholds"]  # [B, K, 2]


def test_first_pass_keeps_the_target_share():
    _, m = tiny_atp(atp_layers=(2, 4), target_tokens=8.0)
    batch = make_batch([3] * 6, [5] * 6, seed=1)
    batch.pop("labels")
    cfg = m.config
    q = keep_share_per_module(cfg.atp_layers, cfg.text_config.num_hidden_layers, LV, cfg.target_tokens)
    m.train()
    thetas = calibrate_thresholds(m, **batch)
    assert len(thetas) == 2 and all(0 < t < 1 for t in thetas)
    assert m.training  # mode restored
    for mod, t in zip(m.atp_modules, thetas):  # the heads' bias now encodes the calibrated theta_r
        assert abs(torch.sigmoid(mod.head_r.bias).item() - t) < 1e-5
    kept, n_bar = _kept(m, batch)
    # each module keeps about q of what reaches it (thresholds are per batch, counts per image)
    assert abs(kept[:, 0].float().mean().item() - q * LV) <= 1.0, (kept, q * LV)  # analytic start: 8 vs 5.9
    assert abs(kept[:, 1].float().mean().item() - q * q * LV) <= 2.0, (kept, q * q * LV)
    assert abs(n_bar.mean().item() - cfg.target_tokens) <= 1.0, n_bar  # analytic start: 9.5


def test_per_module_budget_starts_each_module_at_its_count():
    """budget_loss=per_module: the first pass keeps counts_for_budget's count at each module
    (the schedule the loss pulls to), not a constant share of what reaches it."""
    from model.budget import counts_for_budget

    _, m = tiny_atp(atp_layers=(2, 4), target_tokens=8.0, budget_loss="per_module")
    batch = make_batch([3] * 6, [5] * 6, seed=1)
    batch.pop("labels")
    cfg = m.config
    counts = counts_for_budget(cfg.atp_layers, cfg.text_config.num_hidden_layers, LV, 8.0 / LV)
    calibrate_thresholds(m, **batch)
    kept, _ = _kept(m, batch)
    for k, c in enumerate(counts):
        assert abs(kept[:, k].float().mean().item() - c) <= 1.5, (k, kept[:, k], c)


def test_no_images_or_no_atp_is_a_no_op():
    _, m = tiny_atp(atp_layers=(2, 4))
    before = [mod.head_r.bias.clone() for mod in m.atp_modules]
    batch = make_batch([3, 4], [5, 5], text_only=(0, 1))
    batch.pop("labels")
    assert calibrate_thresholds(m, **batch) == []
    m.config.pruning = "none"
    assert calibrate_thresholds(m, **make_batch([3], [5])) == []
    assert all(torch.equal(b, mod.head_r.bias) for b, mod in zip(before, m.atp_modules))


def test_budget_calibration_meets_the_target_and_keeps_per_image_thresholds():
    """After (here: simulated) training N_bar sits off target; one offset to every threshold bias
    brings the hard path's N_bar on the calibration prompts to the target, and the heads'
    weights, hence the per-image differences in thresholds, are untouched."""
    from model.calibration import calibrate_budget

    _, m = tiny_atp(atp_layers=(2, 4), target_tokens=6.0)
    with torch.no_grad():  # trained-looking heads: thresholds that differ per image
        for mod in m.atp_modules:
            mod.head_r.weight.normal_(std=0.5)
            mod.head_r.bias.fill_(-3.0)  # keeps nearly everything: N_bar far above 6
    batches = []
    for seed in range(3):
        b = make_batch([3] * 4, [5] * 4, seed=seed)
        b.pop("labels")
        batches.append(b)
    _, before = _kept(m, batches[0])
    weights = [mod.head_r.weight.clone() for mod in m.atp_modules]
    m.train()
    (offset,), n_bar = calibrate_budget(m, batches)
    assert m.training and offset > 0 and before.mean() > 9
    assert abs(n_bar - 6.0) <= 0.5, n_bar  # counts are whole tokens per image: a step function
    assert all(torch.equal(mod.head_r.weight, w) for mod, w in zip(m.atp_modules, weights))
    reached = torch.cat([_kept(m, b)[1] for b in batches]).mean().item()
    assert abs(reached - n_bar) < 1e-4  # the offset stays in the model
    thetas = torch.cat([_thresholds(m, b) for b in batches])
    assert thetas[:, 0, 0].std() > 0  # theta_r still differs per image


def test_schedule_calibration_sets_each_module_to_its_count():
    """export.calibrate_schedule: one offset per module, in order, so that each module keeps its
    count of the schedule (a front-loaded module is pulled down, a starved one up)."""
    from model.calibration import calibrate_budget

    _, m = tiny_atp(atp_layers=(2, 4), target_tokens=6.0)
    with torch.no_grad():
        for mod, bias in zip(m.atp_modules, (-3.0, 3.0)):  # first keeps nearly all, second nearly none
            mod.head_r.weight.normal_(std=0.5)
            mod.head_r.bias.fill_(bias)
    batches = []
    for seed in range(3):
        b = make_batch([3] * 4, [5] * 4, seed=seed)
        b.pop("labels")
        batches.append(b)
    offsets, n_bar = calibrate_budget(m, batches, schedule=[9.0, 5.0])
    assert offsets[0] > 0 > offsets[1]
    m.eval()
    kept = torch.stack([m(**b).visual_tokens for b in batches]).flatten(0, 1).mean(0)
    assert abs(kept[2] - 9.0) <= 0.5 and abs(kept[4] - 5.0) <= 0.5, kept
    assert abs(kept.mean() - n_bar) < 1e-4
