"""The run configuration: OmegaConf structured configs (dataclasses), one object from the
YAML to every stage.

`load_config(path, overrides)` merges schema <- YAML <- `key=value` overrides, so an
unknown key or a wrong type fails at once with the full key in the message, and checks
that every input path exists before anything slow is imported. Paths under `run_dir`
are stage outputs and are checked by the stage that reads them.

Kept light on purpose (omegaconf + the data schema only): `python -m pipeline` must be
able to reject a bad config in well under 5 s, before torch, DeepSpeed or a model load.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.data import DataConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

# A field whose value is an input path carries this metadata; `check_paths` visits them,
# and the path fields of schemas owned elsewhere (pipeline.data) listed here.
PATH = {"path": True}
# `${repo:embedded/base}` in a YAML: a path inside this checkout, whatever the working dir
OmegaConf.register_resolver("repo", lambda rel: str(REPO_ROOT / rel), replace=True)
OTHER_PATHS = ("data.shards", "eval.shards")


class ConfigError(ValueError):
    """A config problem, with the offending key in the message."""


@dataclass
class ScratchModelConfig:
    """A randomly initialised tiny LLaVA for the embedded default (no pretrained weights
    exist offline); the word tokenizer of `pipeline.tokenizer` supplies the vocabulary."""

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
class ModelConfig:
    # parts: llama_dir + clip_dir + mm_projector (LLaVA-1.5's own release layout);
    # llava: one HF LLaVA dir; scratch: random tiny model (ScratchModelConfig).
    source: str = "parts"
    llava_dir: Optional[str] = field(default=None, metadata=PATH)
    llama_dir: Optional[str] = field(default=None, metadata=PATH)
    clip_dir: Optional[str] = field(default=None, metadata=PATH)
    mm_projector: Optional[str] = field(default=None, metadata=PATH)
    scratch: ScratchModelConfig = field(default_factory=ScratchModelConfig)
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    freeze_vision: bool = True  # LLaVA-1.5 SFT: the CLIP tower stays frozen
    freeze_lm: bool = False  # LM + projector train at lr_lm unless frozen
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None  # None: the model's own default


@dataclass
class AtpConfig:
    """AtpLlavaConfig's ATP fields (docs/METHOD.md); copied into the model config as-is. Written out
    rather than imported (this module must not import transformers); tests/test_pipeline_config.py
    holds it to AtpLlavaConfig field for field, names, defaults and choices."""

    atp_layers: list[int] = field(default_factory=lambda: [4, 14, 24])
    pruning: str = "atp"
    spatial_strides: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8, 12])
    mask_temperature: float = 50.0  # METHOD's T (not `temperature`: that is generation's)
    lambda_sample: float = 3.0
    lambda_atp: float = 0.05
    lambda_target: float = 0.2
    target_tokens: float = 144.0
    position_mode: str = "preserve"
    score_norm: str = "minmax"
    score_self: str = "attention"
    threshold_hidden: int = 256
    fixed_counts: Optional[list[int]] = None
    mask_eps: float = 1e-6
    attn_kernel: str = "sdpa"  # sdpa | flash | flex | auto (model/kernels.py, docs/GPU.md)


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
    zero_stage: int = 3
    # auto: bf16 on CUDA, fp32 on CPU | bf16 | fp32 | bf16-autocast: fp32 weights and
    # optimizer, bf16 matmuls under torch.autocast (about 1.7x faster than fp32 on this CPU)
    precision: str = "auto"
    ds_config: str = field(default=str(REPO_ROOT / "ds_config.json"), metadata=PATH)
    # atp runs: start theta_r at the target share measured on the first batch (model/calibration.py)
    calibrate_thresholds: bool = True
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
    """Stages `variants` and `eval` (pipeline/evaluate.py): every method at matched budgets."""

    shards: str = "${run_dir}/shards/eval"
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.15, 0.11])  # N_bar / Lv
    # None: every method, `atp`, `fixed` and each policy of model.baselines.POLICIES (its registry)
    methods: Optional[list[str]] = None
    # `variants` trains these per budget (sft + export into run_dir/variants/METHOD-PCT);
    # the main sft's model is `atp` at the budget of atp.target_tokens
    trained: list[str] = field(default_factory=lambda: ["atp", "fixed"])
    variant_overrides: dict[str, Any] = field(default_factory=dict)  # run-config keys for every variant
    limit: Optional[int] = None  # eval samples (None: all)
    batch_size: int = 32
    max_new_tokens: int = 4
    timing_batch: int = 8
    timing_repeats: int = 5
    decode_tokens: int = 8
    overlay_images: int = 4


@dataclass
class ExportConfig:
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    pruning: str = "atp"  # what generate() of the exported model does
    # atp: training samples (first questions, prompted as at evaluation) on which one offset to the threshold
    # biases makes the hard path's N_bar meet atp.target_tokens (model/calibration.py); 0: off
    calibrate_budget: int = 0


@dataclass
class RunConfig:
    run_dir: str = MISSING
    seed: int = 42
    stages: list[str] = field(default_factory=lambda: ["projector", "sft", "export"])
    model: ModelConfig = field(default_factory=ModelConfig)
    atp: AtpConfig = field(default_factory=AtpConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


CHOICES = {
    "model.source": ("parts", "llava", "scratch"),
    "model.vision_feature_select_strategy": ("default", "full"),
    "atp.pruning": ("none", "atp", "fixed"),
    "atp.position_mode": ("preserve", "rope2d"),
    "atp.score_norm": ("minmax", "none"),
    "atp.score_self": ("attention", "duplication"),
    "atp.attn_kernel": ("sdpa", "flash", "flex", "auto"),
    "train.precision": ("auto", "bf16", "fp32", "bf16-autocast"),
    "train.zero_stage": (0, 1, 2, 3),
    "export.dtype": ("float32", "bfloat16", "float16"),
    "export.pruning": ("none", "atp", "fixed"),
}
SOURCE_NEEDS = {"parts": ("llama_dir", "clip_dir", "mm_projector"), "llava": ("llava_dir",), "scratch": ()}


def _error(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    return ConfigError(f"config error at '{key}' ({where}): {msg}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Schema <- YAML <- overrides, interpolations resolved, checked. Raises ConfigError."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config error: config file {str(path)!r} does not exist")
    cfg = OmegaConf.structured(RunConfig)
    for source, layer in (
        (str(path), lambda: OmegaConf.load(path)),
        ("overrides", lambda: OmegaConf.from_dotlist(list(overrides))),
    ):
        try:
            cfg = OmegaConf.merge(cfg, layer())
        except OmegaConfBaseException as e:
            raise _error(e, source) from None
    try:
        OmegaConf.resolve(cfg)
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _error(e, "resolving") from None
    check(run)
    return run


def check(run: RunConfig) -> None:
    """Semantics OmegaConf's types cannot express: choices, stage names, required paths, existence."""
    from pipeline.stages import check_names  # the stage registry's own check; a plain dict, cheap

    check_names(run.stages)
    for key, allowed in CHOICES.items():
        if get(run, key) not in allowed:
            raise ConfigError(f"config error at '{key}': {get(run, key)!r} is not one of {allowed}")
    for name in SOURCE_NEEDS[run.model.source]:
        if get(run, f"model.{name}") is None:
            raise ConfigError(f"config error at 'model.{name}': required when model.source={run.model.source!r}")
    for key in ("data.batch_size", "train.grad_accum", "train.epochs", "train.checkpoint_every", "train.log_every"):
        if get(run, key) < 1:
            raise ConfigError(f"config error at '{key}': must be >= 1, got {get(run, key)}")
    check_paths(run)


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


def save_config(run: RunConfig, path: str | os.PathLike) -> None:
    """The resolved config, written atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(run))
    os.replace(tmp, path)


def as_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
