"""Run config and DeepSpeed config: errors name the key and come fast, before any model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.config import DEFAULT_CONFIG, ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "pipeline" / "configs"


def cli(*args, timeout=60):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return p, time.perf_counter() - t0


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr_lmm=1e-4", "train.lr_lmm"),  # unknown key
        ("train.grad_accum=four", "train.grad_accum"),  # wrong type
        ("data.batch_size=1.5", "data.batch_size"),  # wrong type, in the data schema
        ("model.llama_dir=/nonexistent/vicuna", "model.llama_dir"),  # missing path
        ("data.shards=/nonexistent/shards/train-{000..003}.tar", "data.shards"),
    ],
)
def test_config_errors_fail_fast_naming_the_key(override, key, tmp_path):
    extra = (
        ["model.source=parts", f"model.clip_dir={tmp_path}", f"model.mm_projector={tmp_path}"]
        if key == "model.llama_dir"
        else []
    )
    p, seconds = cli("run", str(DEFAULT_CONFIG), f"run_dir={tmp_path}/run", *extra, override)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"'{key}'" in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()  # nothing ran


def test_unknown_stage_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[1\]"):
        load_config(DEFAULT_CONFIG, [f"run_dir={tmp_path}", "stages=[projector,bogus]"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="'model.source'"):
        load_config(DEFAULT_CONFIG, ["model.source=hub"])


def test_presets_switch_a_group_of_keys_and_the_command_line_wins(tmp_path):
    def load(*o):
        return load_config(DEFAULT_CONFIG, [f"run_dir={tmp_path}/run", *o])

    default, paper = load(), load("preset=paper")
    assert default.preset == "extended" and paper.preset == "paper"
    for run, want in (
        (default, ([0, 5, 9], "duplication", "nearest", 64)),
        (paper, ([1, 5, 9], "attention", "none", 0)),
    ):
        a = run.atp
        assert (a.atp_layers, a.score_self, a.merge, run.export.calibrate_budget) == want
        assert not run.export.calibrate_schedule  # the default: one offset, the learned per-module counts
    # the default's adaptivity recipe (docs/RESULTS.md) vs the paper's budget and lr
    d, p = default.atp, paper.atp
    assert (d.budget_loss, d.threshold_features, d.spatial_modules, d.marginal_weight, d.marginal_center) == (
        "dual",
        ["query", "sorted"],
        [0],
        1.0,
        "own",
    )
    assert (p.budget_loss, p.threshold_features, p.spatial_modules, p.marginal_weight) == ("n_bar", [], None, 0.0)
    assert (default.train.lr_atp, paper.train.lr_atp) == (1e-3, 1e-4)
    assert (default.train.mask_temperature_end, paper.train.mask_temperature_end) == (200, None)  # sharpening band
    assert default.synthetic.args == paper.synthetic.args == ["--turns", "1"]
    assert paper.atp.target_tokens == default.atp.target_tokens  # keys outside the preset stay the file's
    assert load("preset=paper", "atp.merge=nearest").atp.merge == "nearest"
    with pytest.raises(ConfigError, match="'preset'.*'bogus'"):
        load("preset=bogus")


def test_shipped_configs(tmp_path):
    run = load_config(DEFAULT_CONFIG)
    assert run.stages == ["shards", "base", "projector", "sft", "export", "variants", "eval"]
    assert run.data.shards == "runs/default/shards/train"  # interpolated from run_dir
    assert run.model.llama_dir == "runs/default/base/llama" and run.eval.shards == "runs/default/shards/eval"
    # the committed base is the architecture the config describes (the base stage checks it too)
    llama = json.loads((REPO / run.base.weights / "llama" / "config.json").read_text())
    assert (llama["num_hidden_layers"], llama["hidden_size"]) == (
        run.model.scratch.num_layers,
        run.model.scratch.hidden_size,
    )
    # the paper's setup: only its external paths are missing here
    with pytest.raises(ConfigError, match="'model.llama_dir'"):
        load_config(CONFIGS / "llava15_7b.yaml")
    paper = load_config(
        CONFIGS / "llava15_7b.yaml",
        [
            f"model.llama_dir={tmp_path}",
            f"model.clip_dir={tmp_path}",
            f"model.mm_projector={tmp_path}",
            f"data.shards={tmp_path}",
        ],
    )
    assert paper.atp.atp_layers == [4, 14, 24] and paper.atp.target_tokens == 144
    assert (paper.train.lr_lm, paper.train.lr_atp, paper.train.epochs) == (2e-5, 1e-4, 1)
    assert (paper.atp.lambda_target, paper.atp.lambda_atp) == (0.2, 0.05)
    assert paper.train.zero_stage == 3 and paper.train.precision == "bf16"


def test_saved_config_reloads_identically(tmp_path):
    run = load_config(DEFAULT_CONFIG, [f"run_dir={tmp_path}", "train.lr_atp=3e-3", "atp.atp_layers=[2,4]"])
    save_config(run, tmp_path / "config.yaml")
    # the preset is applied already: the file gives the same run, not the preset again
    assert load_config(tmp_path / "config.yaml") == dataclasses.replace(run, presets={})


def test_deepspeed_config_filled_from_the_run(tmp_path):
    from pipeline.train.ds import build_ds_config, load_ds_json

    run = load_config(DEFAULT_CONFIG, ["data.batch_size=3", "train.grad_accum=5", "train.grad_clip=0.5"])
    ds = build_ds_config(run, world_size=4, total_steps=100, hidden_size=64, cuda=False)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        3,
        5,
        60,
    )
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == run.train.lr_lm and ds["optimizer"]["params"]["torch_adam"]
    assert "scheduler" not in ds  # the client LambdaLR
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["overlap_comm"] and z["stage3_gather_16bit_weights_on_model_save"]
    assert "auto" not in json.dumps(ds)
    auto = load_config(DEFAULT_CONFIG, ["train.precision=auto"])  # the default's own is autocast-native
    assert build_ds_config(auto, world_size=1, total_steps=1, hidden_size=64, cuda=True)["bf16"]["enabled"] is True
    assert build_ds_config(run, world_size=1, total_steps=1, hidden_size=64, cuda=True)["bf16"]["enabled"] is False
    # ds_config.json may not set what the YAML owns
    kw = dict(world_size=1, total_steps=1, hidden_size=64, cuda=False)
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({**load_ds_json(run.train.ds_config), "train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(
            load_config(DEFAULT_CONFIG, [f"train.ds_config={bad}"]),
            world_size=1,
            total_steps=1,
            hidden_size=64,
            cuda=False,
        )
    # nor the ZeRO stage: train.zero_stage is its one owner (it used to win over the JSON silently)
    stage = load_ds_json(run.train.ds_config)
    stage["zero_optimization"]["stage"] = 2
    bad.write_text(json.dumps(stage))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        load_ds_json(str(bad))
    assert build_ds_config(load_config(DEFAULT_CONFIG, ["train.zero_stage=1"]), **kw)["zero_optimization"]["stage"] == 1


def test_lr_schedule_warmup_then_cosine_per_group():
    import torch

    from pipeline.train.ds import lr_schedule

    run = load_config(DEFAULT_CONFIG, ["train.warmup_ratio=0.2", "train.min_lr_ratio=0.1"])
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 10.0}])
    sched = lr_schedule(run, total_steps=10)(opt)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    first = [lr[0] for lr in lrs]
    assert first[:2] == pytest.approx([0.5, 1.0])  # 2 warmup steps, the first not at 0
    assert all(a >= b for a, b in zip(first[1:], first[2:]))  # then non-increasing
    assert 0.1 < first[-1] < 0.3
    assert [lr[1] for lr in lrs] == pytest.approx([10 * f for f in first])


def test_base_round_from_parts_on_its_own_shards(tmp_path):
    """`base.init` continues from committed parts; `base.synthetic` sets its shards' options."""
    from pipeline.stages.base import base_run, shard_options

    run = load_config(
        DEFAULT_CONFIG,
        [
            f"run_dir={tmp_path}",
            "base.weights=null",
            f"base.init={REPO / 'embedded/base'}",
            "base.synthetic.turns=8",
            "base.synthetic.fine_share=0.6",
        ],
    )
    opt = shard_options(run)
    assert (opt.turns, opt.fine_share, opt.image_size) == (8, 0.6, run.model.scratch.image_size)
    b = base_run(run, tmp_path / "base")
    assert b.model.source == "parts" and b.model.llama_dir == str(REPO / "embedded/base/llama")
    assert b.data.shards == str(tmp_path / "base" / "shards") and b.atp.pruning == "none"
    assert base_run(load_config(DEFAULT_CONFIG, ["base.weights=null"]), tmp_path).model.source == "scratch"
    with pytest.raises(ValueError, match="'base.synthetic'.*tunrs"):
        shard_options(load_config(DEFAULT_CONFIG, ["base.synthetic.tunrs=8"]))
    with pytest.raises(FileNotFoundError, match="'base.init'"):
        base_run(load_config(DEFAULT_CONFIG, [f"base.init={tmp_path}"]), tmp_path)


def test_atp_section_mirrors_the_model_config_field_for_field(tmp_path):
    """pipeline.core.config.AtpConfig is AtpLlavaConfig's own fields, same names, defaults and choices."""
    import dataclasses
    import typing

    from model import configuration_atp_llava as mc
    from pipeline.core.config import AtpConfig, EvalConfig
    from pipeline.eval.methods import ALL_METHODS

    own = {k for k in mc.AtpLlavaConfig.__annotations__ if not k.startswith("_") and k != "model_type"}
    pipe = {f.name: f for f in dataclasses.fields(AtpConfig)}
    assert set(pipe) == own
    model_defaults = mc.AtpLlavaConfig()
    for name, f in pipe.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        ours = list(default) if isinstance(default, (list, tuple)) else default
        theirs = getattr(model_defaults, name)
        assert ours == (list(theirs) if isinstance(theirs, (list, tuple)) else theirs), name
    choices = {k: typing.get_args(t) for k, t in typing.get_type_hints(AtpConfig).items()}
    assert choices["pruning"] == mc.PRUNING_MODES and choices["position_mode"] == mc.POSITION_MODES
    assert choices["score_norm"] == mc.SCORE_NORMS and choices["score_self"] == mc.SELF_SCORES
    assert choices["attn_kernel"] == mc.ATTN_KERNELS
    method = typing.get_args(typing.get_type_hints(EvalConfig)["methods"])[0]  # Optional[list[Method]]
    assert typing.get_args(typing.get_args(method)[0]) == ALL_METHODS
    run = load_config(DEFAULT_CONFIG, [f"run_dir={tmp_path}", "atp.attn_kernel=flex", "atp.mask_eps=1e-5"])
    assert (run.atp.attn_kernel, run.atp.mask_eps) == ("flex", 1e-5)


# ------------------------------------------------------------------ values that passed and failed later


def _tiny_config(root: Path) -> Path:
    """tests/tiny_pipeline.py's config (ATP at [1, 3] of 8 layers, Lv = 16) over parts that are
    only their config.json files: all that the checks before any model load read."""
    from tiny_pipeline import IMAGE, LAYERS, PATCH, write_config

    parts = {"llama": root / "llama", "clip": root / "clip", "mm_projector": root / "mm_projector.bin"}
    for d, config in (
        ("llama", {"model_type": "llama", "num_hidden_layers": LAYERS}),
        ("clip", {"model_type": "clip_vision_model", "image_size": IMAGE, "patch_size": PATCH}),
    ):
        parts[d].mkdir(parents=True)
        (parts[d] / "config.json").write_text(json.dumps(config))
    parts["mm_projector"].write_bytes(b"")
    (root / "shards").mkdir()
    return write_config(root, parts, root / "shards")


PROBES = [  # issue 16: each was accepted (trained, or failed later with a traceback)
    ("atp.target_tokens=100", "atp.target_tokens"),  # Lv = 16
    ("atp.target_tokens=-5", "atp.target_tokens"),
    ("eval.budgets=[1.5]", "eval.budgets[0]"),
    ("train.max_steps=-1", "train.max_steps"),
    ("atp.atp_layers=[1,100]", "atp.atp_layers"),  # 8 layers
    ("atp.atp_layers=[3,1]", "atp.atp_layers"),
    ("data.overlong=bogus", "data.overlong"),
    ("data.num_workers=-1", "data.num_workers"),
]
MORE = [  # the other closed choices and ranges of the same check
    ("eval.trained=[atp,uniform]", "eval.trained"),
    ("eval.methods=[atp,nope]", "eval.methods"),
    ("eval.budgets=[0.25,0.251]", "eval.budgets"),  # one variant name (atp-25) for two budgets
    ("eval.decode_tokens=0", "eval.decode_tokens"),
    ("train.image_every=0", "train.image_every"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("train.precision=fp64", "train.precision"),
    ("atp.score_self=bogus", "atp.score_self"),
    ("export.pruning=bogus", "export.pruning"),
    ("atp.pruning=fixed", "atp.fixed_counts"),  # no counts
    ("eval.variant_overrides.train.max_steps=0", "train.max_steps"),  # what `variants` merges on
    ("base.overrides.train.max_step=3", "train.max_step"),  # a typo in what `base` merges on
    ("train.lr_lm={a: b", "train.lr_lm"),  # not YAML
]


@pytest.mark.parametrize("override, key", PROBES + MORE)
def test_values_checked_at_load_naming_the_key(override, key, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}")):
        load_config(_tiny_config(tmp_path), [override])


def test_legal_edges_accepted(tmp_path):
    """A point before layer 0 (docs/METHOD.md sec 10), the last layer, target = Lv, no workers."""
    run = load_config(
        _tiny_config(tmp_path),
        ["atp.atp_layers=[0,7]", "atp.target_tokens=16", "data.num_workers=0", "eval.budgets=[0.5]"],
    )
    assert (run.atp.atp_layers, run.atp.target_tokens, run.data.overlong) == ([0, 7], 16, "truncate")
    # the embedded default: parts the `base` stage writes, so model.scratch's size (12 layers, Lv 144)
    with pytest.raises(ConfigError, match="Lv = 144"):
        load_config(DEFAULT_CONFIG, ["atp.target_tokens=145"])
    with pytest.raises(ConfigError, match=r"\[0, 11\]"):
        load_config(DEFAULT_CONFIG, ["atp.atp_layers=[1,12]"])


@pytest.mark.parametrize("override", ["atp.atp_layers=[1,100]", "atp.atp_layers=[3,1]"])
def test_bad_layers_exit_2_before_any_stage(override, tmp_path):
    """Was a 40-line traceback (rc=1) at the projector stage."""
    p, seconds = cli("run", str(_tiny_config(tmp_path)), override)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "'atp.atp_layers'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "run").exists()


def test_size_known_only_from_the_model_config_checked_when_built(tmp_path):
    """A LLaVA dir whose config.json leaves the layer count to transformers' default (32):
    the load-time check cannot know it; the build checks before reading tokenizer or weights."""
    from pipeline.train import build

    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llava",
                "text_config": {"model_type": "llama"},
                "vision_config": {"model_type": "clip_vision_model", "image_size": 336, "patch_size": 14},
            }
        )
    )
    over = ["model.source=llava", f"model.llava_dir={llava}", "atp.atp_layers=[4,40]"]
    run = load_config(_tiny_config(tmp_path), over)  # 32 layers: not known yet
    with pytest.raises(ConfigError, match=r"'atp.atp_layers'.*\[0, 31\]"):
        build.source_parts(run)
    with pytest.raises(ConfigError, match=r"'atp.target_tokens'.*Lv = 576"):  # (336 / 14)^2
        load_config(_tiny_config(tmp_path / "b"), [*over[:2], "atp.target_tokens=600"])


def test_autocast_native_follows_the_hardware(monkeypatch):
    """The default's `autocast-native`: bf16 autocast on CUDA or a CPU with native bf16, fp32 elsewhere
    (emulated bf16 costs ~5x on an AVX2-only CPU); `bf16-autocast` always autocasts."""
    import torch

    from pipeline.train.ds import use_autocast

    run = load_config(DEFAULT_CONFIG)
    assert run.train.precision == "autocast-native"
    assert use_autocast(run, cuda=True)
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert use_autocast(run, cuda=False) is native
    forced = load_config(DEFAULT_CONFIG, ["train.precision=bf16-autocast"])
    assert use_autocast(forced, cuda=False)
    assert not use_autocast(load_config(DEFAULT_CONFIG, ["train.precision=auto"]), cuda=False)
