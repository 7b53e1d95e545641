"""The run configuration: OmegaConf structured configs (dataclasses), one object from the
YAML to every stage.

`load_config(path, overrides)` merges schema <- YAML <- preset <- `key=value` overrides, so an
unknown key or a wrong type fails at once with the full key in the message, and checks
that every input path exists before anything slow is imported. Paths under `run_dir`
are stage outputs and are checked by the stage that reads them.

Kept light on purpose (omegaconf, yaml and the model's stdlib-only ATP value rules,
model/atp_values.py; no torch, held by tests/test_layout.py): `python -m pipeline` must be
able to reject a bad config in well under 5 s, before torch, DeepSpeed or a model load.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.atp_values import AtpValueError
from model.atp_values import check as check_atp_values

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "pipeline" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

# A field whose value is an input path carries this metadata; `check_paths` visits them,
# and the path fields that are plain strings (interpolated defaults) are listed here.
PATH = {"path": True}
# `${repo:embedded/base}` in a YAML: a path inside this checkout, whatever the working dir
OmegaConf.register_resolver("repo", lambda rel: str(REPO_ROOT / rel), replace=True)
OTHER_PATHS = ("data.shards", "eval.shards")


class ConfigError(ValueError):
    """A config problem, with the offending key in the message."""


# Closed choices are Literal types, so OmegaConf rejects any other value at merge time with the
# key named. The ATP ones are written out (no transformers here); tests/test_pipeline_config.py
# holds them to model/configuration_atp_llava.py's tuples.
Pruning = Literal["none", "atp", "fixed"]
# the comparison methods of pipeline/eval/evaluate.py: trained ones, then model/baselines.py's POLICIES
# (pipeline/eval/methods.py, the registry, refuses to import if the two differ)
Method = Literal["atp", "fixed", "fastv", "prumerge", "prumerge+", "sparsevlm", "visionzip", "uniform", "random"]
# the stages of pipeline/stages/__init__.py's registry, in their usual order (it refuses to
# import if the two differ); a closed choice, so a bad name fails at merge with its index named
StageName = Literal["shards", "base", "projector", "sft", "export", "variants", "eval"]


@dataclass
class ScratchModelConfig:
    """A randomly initialised tiny LLaVA for the embedded default (no pretrained weights
    exist offline); the word tokenizer of `pipeline.data.tokenizer` supplies the vocabulary."""

    image_size: int = 96
    patch_size: int = 8
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate_size: int = 512
    hidden_size: int = 128
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 1024


@dataclass
class DataConfig:
    """The loader's settings (pipeline/data/loader.py); `batch_size` is the per-rank micro-batch."""

    shards: str = "data/synthetic/train"  # brace pattern ("dir/train-{000000..000009}.tar") or a folder
    batch_size: int = 16
    num_workers: int = 2
    shuffle_buffer: int = 500  # samples; <= 1 disables shuffling
    resampled: bool = True  # shards with replacement: equal steps on every rank
    max_length: int = 512
    seed: int = 0
    overlong: Literal["truncate", "drop"] = "truncate"  # truncate: never inside image tokens
    epoch_samples: int = 0  # resampled: samples per epoch over all ranks; 0 = dataset size (sizes.json)
    max_consecutive_bad: int = 100  # bad samples in a row (per rank and worker) before TooManyBadSamples


@dataclass
class ModelConfig:
    # parts: llama_dir + clip_dir + mm_projector (LLaVA-1.5's own release layout);
    # llava: one HF LLaVA dir; scratch: random tiny model (ScratchModelConfig).
    source: Literal["parts", "llava", "scratch"] = "parts"
    llava_dir: Optional[str] = field(default=None, metadata=PATH)
    llama_dir: Optional[str] = field(default=None, metadata=PATH)
    clip_dir: Optional[str] = field(default=None, metadata=PATH)
    mm_projector: Optional[str] = field(default=None, metadata=PATH)
    scratch: ScratchModelConfig = field(default_factory=ScratchModelConfig)
    vision_feature_layer: int = -2
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    freeze_vision: bool = True  # LLaVA-1.5 SFT: the CLIP tower stays frozen
    freeze_lm: bool = False  # LM + projector train at lr_lm unless frozen
    gradient_checkpointing: bool = False
    # None: the model's own default; open on purpose: transformers also takes kernel-hub names
    attn_implementation: Optional[str] = None


@dataclass
class AtpConfig:
    """AtpLlavaConfig's ATP fields (docs/METHOD.md); copied into the model config as-is. Written out
    rather than imported (this module must not import transformers); tests/test_pipeline_config.py
    holds it to AtpLlavaConfig field for field, names, defaults and choices."""

    atp_layers: list[int] = field(default_factory=lambda: [4, 14, 24])
    pruning: Pruning = "atp"
    spatial_strides: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8, 12])
    spatial_modules: Optional[list[int]] = None  # METHOD sec 2: where the spatial branch keeps; None: all
    mask_temperature: float = 50.0  # METHOD's T (not `temperature`: that is generation's)
    lambda_sample: float = 3.0
    lambda_atp: float = 0.05
    lambda_target: float = 0.2
    target_tokens: float = 144.0
    position_mode: Literal["preserve", "rope2d"] = "preserve"
    score_norm: Literal["minmax", "none"] = "minmax"
    score_self: Literal["attention", "duplication"] = "attention"
    score_mix: Literal["even", "question"] = "even"  # METHOD sec 17
    merge: Literal["none", "nearest"] = "none"
    merge_temperature: float = 20.0
    budget_loss: Literal["n_bar", "per_module", "dual"] = "n_bar"
    dual_lr: float = 1.0
    marginal_weight: float = 0.0  # METHOD sec 16
    marginal_span: float = 0.5
    marginal_signal: Literal["loss", "answer"] = "loss"
    marginal_center: Literal["schedule", "own"] = "schedule"
    marginal_share: Literal["all", "redundancy"] = "all"
    marginal_rank: Literal["fixed", "own"] = "fixed"
    branch_weight: float = 0.0  # METHOD sec 18
    threshold_hidden: int = 256
    threshold_features: list[Literal["query", "sorted"]] = field(default_factory=list)  # METHOD sec 14
    fixed_counts: Optional[list[int]] = None
    mask_eps: float = 1e-6
    straight_through: bool = False  # METHOD sec 20
    attn_kernel: Literal["sdpa", "flash", "flex", "channel", "auto"] = "sdpa"  # model/kernels.py, docs/GPU.md
    hard_layout: Literal["padded", "packed"] = "padded"  # the hard path's batch layout (model/packed.py)


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (short runs)
    grad_accum: int = 1  # micro-batches per optimizer step; the micro-batch is data.batch_size
    lr_lm: float = 2e-5  # LM + projector
    lr_atp: float = 1e-4  # ATP modules (`atp_modules.*`)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine floor, as a share of each group's lr
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2, 3] = 3
    # resume from a checkpoint saved with another global batch (batch_size x grad_accum x world
    # size): refused by default (pipeline/train/ckpt_record.py); the LR schedule's length then follows
    # the new batch, its position the step count
    allow_batch_change: bool = False
    # auto: bf16 on CUDA, fp32 on CPU | bf16 | fp32 | bf16-autocast: fp32 weights and optimizer, bf16
    # matmuls under torch.autocast (about 1.7x faster than fp32 on a CPU with AVX512-BF16, ~6x slower
    # on an AVX2-only one) | autocast-native: bf16-autocast on CUDA or a CPU with native bf16, else fp32
    precision: Literal["auto", "bf16", "fp32", "bf16-autocast", "autocast-native"] = "auto"
    ds_config: str = field(default=str(REPO_ROOT / "ds_config.json"), metadata=PATH)
    # atp runs: start theta_r at the target share measured on the first batch (model/calibration.py)
    calibrate_thresholds: bool = True
    # soft masks' temperature annealed geometrically from atp.mask_temperature at the first step to
    # this at the last (METHOD sec 19); None: constant
    mask_temperature_end: Optional[float] = None
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 2
    # steps in a row with a non-finite loss or gradients (each skipped) before the run stops
    max_nonfinite_steps: int = 10
    log_every: int = 1  # TensorBoard scalars
    image_every: int = 200  # TensorBoard kept-token images
    # Fault injection for the resume test: this rank SIGKILLs itself when it reaches this
    # step (after the checkpoints before it). Never set in a real run.
    crash_at_step: Optional[int] = None
    crash_rank: int = 1


@dataclass
class SyntheticConfig:
    """Stage `shards`: the synthetic benchmark (shards.synthetic) into run_dir/shards/{train,eval}."""

    train_samples: int = 2000
    eval_samples: int = 200
    image_size: int = 128
    seed: int = 0
    maxcount: int = 250  # samples per shard: several shards, so ranks and workers each get some
    args: list[str] = field(default_factory=list)  # more `python -m shards.synthetic` options


@dataclass
class BaseConfig:
    """Stage `base` (embedded default only): a tiny LLaVA (model.scratch) trained from scratch
    on its own synthetic train shards, written in LLaVA-1.5's release layout (run_dir/base:
    llama/, clip/, mm_projector.bin), where LLaVA-1.5's pretrain + projector stages would be."""

    # Committed parts (embedded/base): copied instead of retrained when set. Train anew with
    # `base.weights=null` (embedded/README.md).
    weights: Optional[str] = field(default=None, metadata=PATH)
    # Parts (llama/, clip/, mm_projector.bin) to continue training from instead of a
    # scratch init: a second round on fresh shards with a new schedule.
    init: Optional[str] = field(default=None, metadata=PATH)
    train_samples: int = 20000
    seed: int = 1000  # its shards differ from the sft/eval shards (synthetic.seed)
    # shards.synthetic.Options fields for its shards (e.g. turns, fine_share); image_size
    # always comes from model.scratch
    synthetic: dict[str, Any] = field(default_factory=dict)
    # run-config keys for the base training only, merged onto this config (train.*, data.*)
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Stages `variants` and `eval` (pipeline/eval/evaluate.py): every method at matched budgets."""

    shards: str = "${run_dir}/shards/eval"
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.15, 0.11])  # N_bar / Lv
    # None: every method, `atp`, `fixed` and each policy of model.baselines.POLICIES (its registry)
    methods: Optional[list[Method]] = None
    # `variants` trains these per budget (sft + export into run_dir/variants/METHOD-PCT);
    # the main sft's model is `atp` at the budget of atp.target_tokens
    trained: list[Literal["atp", "fixed"]] = field(default_factory=lambda: ["atp", "fixed"])
    variant_overrides: dict[str, Any] = field(default_factory=dict)  # run-config keys for every variant
    # `variants` also trains the unpruned model with the same sft recipe and steps (SFT_REFERENCE):
    # the report's fair reference, beside the untouched base
    sft_reference: bool = True
    limit: Optional[int] = None  # eval samples (None: all)
    batch_size: int = 32
    max_new_tokens: int = 4
    timing_batch: int = 8
    timing_repeats: int = 5
    decode_tokens: int = 8
    overlay_images: int = 4
    # the hard path's batch layout of every evaluated model (model/packed.py); None: each checkpoint's
    # own, i.e. atp.hard_layout of the run that exported it
    hard_layout: Optional[Literal["padded", "packed"]] = None


@dataclass
class ExportConfig:
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    pruning: Pruning = "atp"  # what generate() of the exported model does
    # atp: training samples (first questions, prompted as at evaluation) on which one offset to the threshold
    # biases makes the hard path's N_bar meet atp.target_tokens (model/calibration.py); 0: off
    calibrate_budget: int = 0
    # with calibrate_budget: one offset per module instead, so that module k keeps the count
    # model.budget.counts_for_budget gives it (paper Table 2's shape; N_bar = target)
    calibrate_schedule: bool = False


@dataclass
class RunConfig:
    run_dir: str = MISSING
    seed: int = 42
    # A preset is a named group of settings from `presets` (e.g. the paper's reading of ATP vs the
    # project's default), merged over the YAML's own keys and under the command line's: `preset=paper`
    # switches all of them, `preset=paper atp.merge=nearest` changes one on top. A saved run config
    # holds the result with `presets` empty; `preset` then only names what was applied.
    preset: Optional[str] = None
    presets: dict[str, Any] = field(default_factory=dict)
    stages: list[StageName] = field(default_factory=lambda: ["projector", "sft", "export"])
    model: ModelConfig = field(default_factory=ModelConfig)
    atp: AtpConfig = field(default_factory=AtpConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


SOURCE_NEEDS = {"parts": ("llama_dir", "clip_dir", "mm_projector"), "llava": ("llava_dir",), "scratch": ()}
# The lowest value of each count OmegaConf types as int but cannot bound (None: unset is fine).
MINIMUM = {
    "data.batch_size": 1,
    "data.num_workers": 0,
    "data.max_length": 1,
    "data.shuffle_buffer": 0,
    "data.epoch_samples": 0,
    "data.max_consecutive_bad": 1,
    "train.epochs": 1,
    "train.max_steps": 1,  # -1 ran 0 steps and marked sft DONE; 0 read as "no limit"
    "train.grad_accum": 1,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 1,
    "train.log_every": 1,
    "train.image_every": 1,
    "train.max_nonfinite_steps": 1,
    "train.mask_temperature_end": 0.1,
    "atp.threshold_hidden": 1,
    **{f"model.scratch.{f.name}": 1 for f in dataclasses.fields(ScratchModelConfig)},
    "synthetic.train_samples": 1,
    "synthetic.eval_samples": 1,
    "synthetic.image_size": 1,
    "synthetic.maxcount": 1,
    "base.train_samples": 1,
    "eval.limit": 1,
    "eval.batch_size": 1,
    "eval.max_new_tokens": 1,
    "eval.timing_batch": 1,
    "eval.timing_repeats": 1,
    "eval.decode_tokens": 1,
    "eval.overlay_images": 0,
    "export.calibrate_budget": 0,
}
SHARES = ("train.warmup_ratio", "train.min_lr_ratio")  # in [0, 1]
# run-config keys merged onto this config by a stage: checked here as if they were the run's own
OVERLAYS = ("base.overrides", "eval.variant_overrides")


def _error(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    return ConfigError(f"config error at '{key}' ({where}): {msg}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), files: bool = True) -> RunConfig:
    """Schema <- YAML <- preset <- overrides, interpolations resolved, checked (`files=False`:
    not whether the paths exist, for planning elsewhere). Raises ConfigError."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config error: config file {str(path)!r} does not exist")
    cfg = OmegaConf.structured(RunConfig)
    # the preset a `preset=NAME` override names, else the YAML's (read once the YAML is merged)
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "preset"]
    layers = [(str(path), lambda: OmegaConf.load(path))]
    layers += [("preset", lambda: _preset(cfg, chosen[-1] if chosen else cfg.preset))]
    layers += [(f"override {o!r}", lambda o=o: OmegaConf.from_dotlist([o])) for o in overrides]
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer())
        except OmegaConfBaseException as e:
            raise _error(e, source) from None
        except yaml.YAMLError as e:  # a value (or the file) that is not YAML
            raise ConfigError(f"config error ({source}): not valid YAML: {' '.join(str(e).split())}") from None
    try:
        OmegaConf.resolve(cfg)
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _error(e, "resolving") from None
    check(run, files=files)
    return run


def _preset(cfg, name: str | None):
    """The settings of preset `name` from the config's `presets` (nothing when there are none)."""
    if name is None or not cfg.presets:
        return {}
    if name not in cfg.presets:
        raise ConfigError(f"config error at 'preset': {name!r} is not one of {sorted(cfg.presets)}")
    return cfg.presets[name]


def save_config(run: RunConfig, path: str | os.PathLike) -> None:
    """The resolved config, written atomically (a crash never leaves half a file). The preset is
    already applied, so `presets` is left out: rerunning the file gives the same run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(dataclasses.replace(run, presets={})))
    os.replace(tmp, path)


def check(run: RunConfig, files: bool = True) -> None:
    """What OmegaConf's types cannot express: required and existing paths (`files=False`: not
    checked), value ranges, and the ATP settings against the model's size where its config
    files tell it."""
    for name in SOURCE_NEEDS[run.model.source]:
        if get(run, f"model.{name}") is None:
            raise ConfigError(f"config error at 'model.{name}': required when model.source={run.model.source!r}")
    check_values(run)
    for key in OVERLAYS:
        try:
            merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(run), get(run, key)))
        except OmegaConfBaseException as e:
            raise _error(e, key) from None
        try:
            check_values(merged)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {key})") from None
    if files:
        check_paths(run)


def check_values(run: RunConfig) -> None:
    """Ranges, budgets and the ATP settings: what a stage would otherwise meet late, or never."""
    for key, low in MINIMUM.items():
        value = get(run, key)
        if value is not None and value < low:
            raise ConfigError(f"config error at '{key}': must be >= {low}, got {value}")
    for key in SHARES:
        if not 0 <= get(run, key) <= 1:
            raise ConfigError(f"config error at '{key}': must be in [0, 1], got {get(run, key)}")
    for i, b in enumerate(run.eval.budgets):
        if not 0 < b < 1:
            raise ConfigError(f"config error at 'eval.budgets[{i}]': a budget is N_bar / Lv, in (0, 1); got {b}")
    names = [round(b * 100) for b in run.eval.budgets]  # pipeline/stages/variants.py's variant names
    if len(set(names)) < len(names):
        raise ConfigError(f"config error at 'eval.budgets': {run.eval.budgets} give the same percent twice")
    check_model(run, *model_size(run))


def check_model(run: RunConfig, num_layers: int | None, num_visual_tokens: int | None) -> None:
    """The ATP settings against the model's size (None: not known yet), by the model's own rules
    (model/atp_values.py, stdlib only). `check` calls it when the model's config files tell the
    size; pipeline.train.build again once the model config exists."""
    a = run.atp
    try:
        check_atp_values(
            a.atp_layers,
            num_layers,
            a.pruning,
            a.fixed_counts,
            a.target_tokens,
            num_visual_tokens,
            budget_loss=a.budget_loss,
            marginal_weight=a.marginal_weight,
            marginal_span=a.marginal_span,
            branch_weight=a.branch_weight,
            spatial_strides=a.spatial_strides,
            spatial_modules=a.spatial_modules,
        )
    except AtpValueError as e:
        raise ConfigError(f"config error at 'atp.{e.field}': {e}") from None


def model_size(run: RunConfig) -> tuple[int | None, int | None]:
    """(decoder layers, Lv) of the configured model, as far as known before anything is loaded:
    `scratch` from model.scratch; `parts` from the Llama and CLIP config.json (model.scratch when
    they do not exist yet and the `base` stage will write them); `llava` from its config.json
    when it names them (transformers' defaults fill the rest: known only once built)."""
    m = run.model
    if m.source == "scratch" or (m.source == "parts" and not os.path.exists(m.llama_dir) and "base" in run.stages):
        s = m.scratch
        layers, image, patch = s.num_layers, s.image_size, s.patch_size
    elif m.source == "parts":
        layers = _json(m.llama_dir).get("num_hidden_layers")
        vision = _json(m.clip_dir)
        vision = vision.get("vision_config", vision)  # a full CLIP dir holds the tower's config inside
        image, patch = vision.get("image_size"), vision.get("patch_size")
    else:
        config = _json(m.llava_dir)
        layers = config.get("text_config", {}).get("num_hidden_layers")
        image, patch = (config.get("vision_config", {}).get(k) for k in ("image_size", "patch_size"))
    lv = visual_tokens(image, patch, m.vision_feature_select_strategy) if image and patch else None
    return layers, lv


def visual_tokens(image_size: int, patch_size: int, strategy: str) -> int:
    """Lv, as AtpLlavaConfig.num_visual_tokens: the patch grid; "default" drops CLS, "full" keeps it."""
    return (image_size // patch_size) ** 2 + (1 if strategy == "full" else 0)


def _json(directory: str | None) -> dict:
    """A model dir's config.json ({} when absent or unreadable: then the build checks)."""
    try:
        with open(os.path.join(directory or "", "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_paths(run: RunConfig) -> None:
    """Every set path field must exist, unless it lies under run_dir (a stage's output)."""
    run_dir = os.path.abspath(run.run_dir)
    for key, value in [*_path_fields(run), *((k, get(run, k)) for k in OTHER_PATHS)]:
        if value is None or value == "":
            continue
        if os.path.abspath(value).startswith(run_dir + os.sep):
            continue
        if not _exists(value):
            raise ConfigError(f"config error at '{key}': path {value!r} does not exist")


def _path_fields(obj: Any, prefix: str = ""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _path_fields(value, key + ".")
        elif f.metadata.get("path"):
            yield from ((f"{key}[{i}]", v) for i, v in enumerate(value)) if isinstance(value, list) else [(key, value)]


def _exists(value: str) -> bool:
    """A plain path, a glob, or a webdataset brace pattern (`shard-{000..009}.tar`)."""
    if "{" in value:
        from braceexpand import braceexpand  # webdataset's own dependency

        return all(os.path.exists(p) for p in braceexpand(value))
    if any(c in value for c in "*?["):
        return bool(glob.glob(value))
    return os.path.exists(value)


def get(run: RunConfig, dotted: str) -> Any:
    obj = run
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
