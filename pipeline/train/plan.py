"""python -m pipeline plan [CONFIG] --nodes N --gpus-per-node G --gpu-mem GiB [key=value ...]

The memory plan of a run before it starts, per GPU (docs: pipeline/README.md "Planning a run"):

- Model states under ZeRO-3: DeepSpeed's own estimator
  (`estimate_zero3_model_states_mem_needs`, no offload) for the trainable parameters: 18 bytes
  each over all GPUs (bf16 weights and gradients, fp32 master weights and Adam's two moments,
  buffers) plus the largest layer gathered whole (4 bytes per parameter). Weights kept in fp32
  (train.precision fp32, bf16-autocast, or autocast-native without bf16) add 4 bytes per
  trainable parameter (weights and gradients at 4 bytes, not 2); frozen parameters hold only
  their partitioned weights.
- Activations per sample at sequence length L (data.max_length unless --seq-len), what
  autograd keeps for the backward pass, b_w the weights' element size (the residual stream,
  the norms), b_c the compute dtype's (bf16 under autocast):
    decoder layer, per token: 4h b_w (layer input, normed input, residual, normed residual)
                            + (2h + 2h_kv + 4i) b_c (q, attention output, k, v; gate, up,
                              SiLU(gate), their product)
    soft-mask attention (training, SDPA with the dense additive mask, which has a gradient):
      per layer the softmax output H L^2 b_c and the scaled copies of q and k L (h + h_kv) b_c
      (SDPA's math path: the CPU, and CUDA when no fused kernel takes a mask with a
      gradient), and the mask L^2 b_c once per group of layers between pruning points (K + 1
      groups); a fused kernel (attn_kernel=flash/flex/channel) keeps none of them
    LM head: the logits L V b_c (returned) and the fp32 log-softmax L V 4 of the loss
    vision tower, when it trains: per layer and token 8 h_v + 2 i_v (+ H_v L_v with the
    softmax), L_v = patches (+ CLS)
  With gradient checkpointing (model.gradient_checkpointing) a layer keeps only its input
  (L h b_w) and one layer is recomputed at a time (its full activations once), the masks and
  the head unchanged.
- The backward's working set on top of what is kept, per sample: the soft-mask attention's
  backward in one layer holds the gradients of the softmax output and of the scores (2 H L^2
  b_c) and the mask's gradient (L^2 b_c) at once. Negligible at a few hundred tokens, it is
  two fifths of the peak with checkpointing at L = 2048 (torch's MemTracker at
  shape576.yaml's shape: 80.5 MiB of 200 MiB; docs/RESULTS.md "The 576-token run").
  Not modelled: the runtime's own working memory (DeepSpeed's engine and buckets, kernel
  workspaces; about 90 MiB on the CPU for the embedded default, docs/RESULTS.md) and what
  the allocator holds beyond the live tensors: --reserve covers them.
- The largest micro-batch whose model states + micro-batch x activations fit in the GPU's
  memory less --reserve (CUDA context, allocator fragmentation, DeepSpeed's buckets).
- Steps per epoch and tokens per step: the data's samples (sizes.json beside the shards, or
  --samples) over the global batch; tokens per step at most global batch x L (padding
  included).

The model's shape comes from the parts' config.json (model.llama_dir / clip_dir, or
model.llava_dir); for the embedded default from base.weights; where the parts are not on this
machine (the 7B example) from the released shapes of their directory names (RELEASED). The
model is instantiated on torch's meta device (no memory) to count its parameters exactly,
ATP modules and projector included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ConfigError, RunConfig, load_config, visual_tokens

GiB = 2**30
# Public architectures of LLaVA-1.5's parts (their config.json), for planning without the files.
RELEASED = {
    "vicuna-7b-v1.5": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
    "vicuna-13b-v1.5": dict(
        model_type="llama",
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
    ),
    "clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    ),
}


@dataclass
class Shape:
    h: int  # decoder hidden size
    h_kv: int  # k/v width: kv heads x head dim
    i: int  # MLP intermediate size
    heads: int
    layers: int
    vocab: int
    h_v: int  # vision tower
    i_v: int
    heads_v: int
    layers_v: int
    lv: int  # visual tokens at the LLM input
    patches: int  # tokens in the vision tower (CLS included)
    groups: int  # groups of decoder layers sharing one mask: pruning points + 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline plan", description=__doc__.splitlines()[0])
    p.add_argument("rest", nargs="*", metavar="[CONFIG] key=value")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, required=True, help="GiB per GPU (per process on a CPU)")
    p.add_argument("--seq-len", type=int, help="sequence length to plan at (default data.max_length)")
    p.add_argument("--samples", type=int, help="samples per epoch (default: sizes.json beside data.shards)")
    p.add_argument("--reserve", type=float, default=0.1, help="share of GPU memory kept free (default 0.1)")
    p.add_argument("--json", help="also write the plan here")
    a = p.parse_intermixed_args(argv)  # options and key=value in any order
    config = a.rest.pop(0) if a.rest and "=" not in a.rest[0] else None
    try:
        run = load_config(config, a.rest, files=False)
        result = plan(run, a.nodes, a.gpus_per_node, a.gpu_mem, a.seq_len, a.samples, a.reserve)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def plan(
    run: RunConfig,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_gib: float,
    seq_len: int | None = None,
    samples: int | None = None,
    reserve: float = 0.1,
) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    gpus = nodes * gpus_per_node
    config, source = model_config(run)
    counts = count_parameters(config, run)
    shape = shape_of(config)
    L = seq_len or run.data.max_length
    b_w, b_c = element_sizes(run.train.precision)
    _, ds_bytes, largest_layer_bytes = estimate_zero3_model_states_mem_needs(
        counts["trainable"],
        counts["largest_layer"],
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    model_states = ds_bytes + counts["frozen"] * b_w / gpus
    if b_w == 4:
        model_states += 4 * counts["trainable"] / gpus
    act = activations(shape, L, b_w, b_c, train_vision=not run.model.freeze_vision)
    gc = run.model.gradient_checkpointing
    per_sample = act["with_gc" if gc else "without_gc"]
    budget = gpu_mem_gib * GiB * (1 - reserve)
    largest = {k: max(0, math.floor((budget - model_states) / act[k])) for k in ("without_gc", "with_gc")}
    micro = run.data.batch_size
    global_batch = micro * run.train.grad_accum * gpus
    n = samples or run.data.epoch_samples or _dataset_size(run)
    return {
        "config": {
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "gpu_mem_gib": gpu_mem_gib,
            "reserve": reserve,
            "precision": run.train.precision,
            "bytes_weights_compute": [b_w, b_c],
            "micro_batch": micro,
            "grad_accum": run.train.grad_accum,
            "global_batch": global_batch,
            "seq_len": L,
            "gradient_checkpointing": gc,
            "model_source": source,
        },
        "parameters": counts,
        "shape": shape.__dict__,
        "per_gpu": {
            "model_states_bytes": int(model_states),
            "deepspeed_estimate_bytes": int(ds_bytes),
            "largest_layer_bytes": int(largest_layer_bytes),
            "activation_per_sample_bytes": {k: int(v) for k, v in act.items()},
            "activation_micro_batch_bytes": {k: int(v * micro) for k, v in act.items()},
            "total_bytes": int(model_states + micro * per_sample),
            "fits": model_states + micro * per_sample <= budget,
            "largest_micro_batch": largest,
        },
        "data": {
            "samples_per_epoch": n,
            "steps_per_epoch": None if not n else n // global_batch,
            "tokens_per_step_max": global_batch * L,
        },
    }


def element_sizes(precision: str) -> tuple[int, int]:
    """(weights, compute) bytes per element as the trainer runs `precision` (pipeline.train.ds):
    bf16: both 2; fp32: both 4; autocast: fp32 weights, bf16 matmuls. autocast-native counts as
    autocast (on a GPU; on an AVX2-only CPU it runs fp32: plan it with train.precision=fp32)."""
    if precision in ("bf16", "auto"):
        return 2, 2
    if precision == "fp32":
        return 4, 4
    return 4, 2


def activations(s: Shape, L: int, b_w: int, b_c: int, train_vision: bool) -> dict:
    """Bytes per sample (the formulas of the module docstring): `without_gc` / `with_gc` the peak,
    `saved_*` what autograd keeps for the backward."""
    layer_tok = 4 * s.h * b_w + (2 * s.h + 2 * s.h_kv + 4 * s.i) * b_c
    probs = s.heads * L * L * b_c + L * (s.h + s.h_kv) * b_c  # per layer: softmax, and q/k scaled by the math path
    masks = s.groups * L * L * b_c
    head = L * s.vocab * (b_c + 4)
    layer = L * layer_tok + probs
    vision = 0
    vision_layer = s.patches * (8 * s.h_v + 2 * s.i_v) * b_c + s.heads_v * s.patches**2 * b_c
    if train_vision:
        vision = s.layers_v * vision_layer
    vision_gc = (s.layers_v * s.patches * s.h_v * b_w + vision_layer) if train_vision else 0
    working = (2 * s.heads + 1) * L * L * b_c  # one layer's attention backward: d(softmax), d(scores), d(mask)
    saved = s.layers * layer + masks + head + vision
    saved_gc = s.layers * L * s.h * b_w + layer + masks + head + vision_gc
    return {
        # the peak per sample: what is kept for the backward, and the backward's working set
        "without_gc": saved + working,
        "with_gc": saved_gc + working,
        "saved_without_gc": saved,
        "saved_with_gc": saved_gc,
        "backward_working": working,
        "soft_mask_attention": s.layers * probs + masks,
        "soft_mask_attention_with_gc": probs + masks,
        "lm_head": head,
    }


def model_config(run: RunConfig):
    """(AtpLlavaConfig of the configured model, where its shape came from)."""
    from model import AtpLlavaConfig
    from pipeline.train.build import atp_fields

    m = run.model
    if m.source == "llava":
        data = _read_json(Path(m.llava_dir) / "config.json")
        text, vision, source = data["text_config"], data["vision_config"], m.llava_dir
    elif m.source == "scratch" or (m.source == "parts" and not Path(m.llama_dir).is_dir() and "base" in run.stages):
        text, vision, source = _from_base(run)
    else:
        text, source_t = _part(m.llama_dir)
        vision, source_v = _part(m.clip_dir)
        vision = vision.get("vision_config", vision)
        source = f"{source_t}; {source_v}"
    vision = {**vision, "model_type": "clip_vision_model"}
    lv = visual_tokens(vision["image_size"], vision["patch_size"], m.vision_feature_select_strategy)
    config = AtpLlavaConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=lv,
        projector_hidden_act="gelu",
        tie_word_embeddings=text.get("tie_word_embeddings", False),
        **atp_fields(run),
    )
    return config, source


def _part(directory: str) -> tuple[dict, str]:
    path = Path(directory) / "config.json"
    if path.is_file():
        return _read_json(path), str(path)
    name = Path(directory).name
    if name in RELEASED:
        return dict(RELEASED[name]), f"{name} (released shape; {directory} not found)"
    raise FileNotFoundError(f"{path} not found and {name!r} is not a known release ({sorted(RELEASED)})")


def _from_base(run: RunConfig) -> tuple[dict, dict, str]:
    """The embedded default: the committed parts (base.weights), else model.scratch."""
    if run.base.weights and (Path(run.base.weights) / "llama" / "config.json").is_file():
        w = Path(run.base.weights)
        clip = _read_json(w / "clip" / "config.json")
        return _read_json(w / "llama" / "config.json"), clip.get("vision_config", clip), str(w)
    from pipeline.data.tokenizer import build_word_tokenizer
    from pipeline.train.build import scratch_configs

    text, vision = scratch_configs(run, build_word_tokenizer())
    return text, vision, "model.scratch"


def _read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def count_parameters(config, run: RunConfig) -> dict:
    """Exact counts from the model built on the meta device: total, trainable (the trainer's
    freezing), frozen, and the largest layer (the most parameters one module owns directly,
    what ZeRO-3 gathers at once)."""
    import torch

    from model import AtpLlavaForConditionalGeneration

    with torch.device("meta"):
        model = AtpLlavaForConditionalGeneration(config)
    frozen_prefixes = []
    if run.model.freeze_vision:
        frozen_prefixes.append("model.vision_tower.")
    if run.model.freeze_lm:
        frozen_prefixes += ["model.language_model.", "lm_head.", "model.multi_modal_projector."]
    total = frozen = 0
    for name, p in model.named_parameters():
        total += p.numel()
        frozen += p.numel() if name.startswith(tuple(frozen_prefixes)) else 0
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": total, "trainable": total - frozen, "frozen": frozen, "largest_layer": largest}


def shape_of(config) -> Shape:
    t, v = config.text_config, config.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    return Shape(
        h=t.hidden_size,
        h_kv=kv * head_dim,
        i=t.intermediate_size,
        heads=t.num_attention_heads,
        layers=t.num_hidden_layers,
        vocab=t.vocab_size,
        h_v=v.hidden_size,
        i_v=v.intermediate_size,
        heads_v=v.num_attention_heads,
        layers_v=v.num_hidden_layers,
        lv=config.num_visual_tokens,
        patches=(v.image_size // v.patch_size) ** 2 + 1,
        groups=(len(config.atp_layers) if config.pruning != "none" else 0) + 1,
    )


def _dataset_size(run: RunConfig) -> int | None:
    from pipeline.data.loader import dataset_size, list_shards

    try:
        return dataset_size(list_shards(run.data.shards))
    except (FileNotFoundError, OSError):
        return None


def render(r: dict) -> str:
    c, pg, d, n = r["config"], r["per_gpu"], r["data"], r["parameters"]
    gb = lambda x: f"{x / GiB:7.2f} GiB" if x >= GiB else f"{x / 2**20:7.1f} MiB"  # noqa: E731
    act = pg["activation_per_sample_bytes"]
    gc = "on" if c["gradient_checkpointing"] else "off"
    lines = [
        f"plan: {c['nodes']} node(s) x {c['gpus_per_node']} GPU(s) of {c['gpu_mem_gib']:g} GiB, ZeRO-3, "
        f"precision {c['precision']} (bytes: weights {c['bytes_weights_compute'][0]}, "
        f"compute {c['bytes_weights_compute'][1]})",
        f"model: {n['total']:,} parameters ({n['trainable']:,} trainable, {n['frozen']:,} frozen; "
        f"largest layer {n['largest_layer']:,}) from {c['model_source']}",
        f"micro-batch {c['micro_batch']} x grad_accum {c['grad_accum']} x {c['nodes'] * c['gpus_per_node']} GPUs "
        f"= global batch {c['global_batch']}; sequence length {c['seq_len']}; gradient checkpointing {gc}",
        "",
        "per GPU:",
        f"  model states (DeepSpeed's ZeRO-3 estimate{' + fp32 weights' if c['bytes_weights_compute'][0] == 4 else ''}"
        f" + frozen):{gb(pg['model_states_bytes'])}",
        f"  activations per sample, without gradient checkpointing: {gb(act['without_gc'])}",
        f"  activations per sample, with gradient checkpointing:    {gb(act['with_gc'])}",
        f"    of which soft-mask attention (softmax + masks): {gb(act['soft_mask_attention'])} without, "
        f"{gb(act['soft_mask_attention_with_gc'])} with checkpointing (a fused kernel keeps neither)",
        f"    of which LM head (logits + fp32 log-softmax):   {gb(act['lm_head'])}",
        f"    of which the backward's working set (one layer's attention gradients): {gb(act['backward_working'])}",
        f"  at micro-batch {c['micro_batch']} (checkpointing {gc}): {gb(pg['total_bytes'])} of "
        f"{c['gpu_mem_gib'] * (1 - c['reserve']):.2f} GiB usable -> {'fits' if pg['fits'] else 'DOES NOT FIT'}",
        f"  largest micro-batch that fits: {pg['largest_micro_batch']['without_gc']} without, "
        f"{pg['largest_micro_batch']['with_gc']} with gradient checkpointing",
        "",
        f"data: {d['samples_per_epoch'] if d['samples_per_epoch'] else 'unknown (--samples)'} samples per epoch -> "
        f"{d['steps_per_epoch'] if d['steps_per_epoch'] is not None else '?'} steps per epoch; "
        f"at most {d['tokens_per_step_max']:,} tokens per step (global batch x {c['seq_len']})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
