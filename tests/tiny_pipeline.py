"""A tiny pipeline setup shared by tests/test_pipeline.py and tests/test_slurm.py.

`build(root)` writes LLaVA-1.5-style parts (a Llama dir with the word tokenizer, a CLIP
dir, `mm_projector.bin` in LLaVA's key names), 64 tiny synthetic samples in shards of 16
and `root/tiny.yaml` (ATP at [1, 3] of 8 layers, Lv = 16, 4 samples per rank, fp32 on a
CPU). Overrides on the command line adapt it per test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}
LAYERS, IMAGE, PATCH = 8, 32, 8
LV = (IMAGE // PATCH) ** 2  # 16 visual tokens
SAMPLES, BATCH = 64, 4  # 64 / (2 ranks x 4) = 8 steps per epoch at world size 2
STEPS = 6


def launch(args, nproc=2, timeout=300, check=True, master_port=None):
    """`torchrun --standalone --nproc_per_node N -m pipeline ARGS` (1: plain python); with
    `master_port`, a static single-node rendezvous on 127.0.0.1:master_port instead."""
    where = (
        ["--standalone"]
        if master_port is None
        else ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={master_port}"]
    )
    runner = ["-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *runner, "-m", "pipeline", *map(str, args)]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def make_parts(root: Path) -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from pipeline.data.tokenizer import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer()
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            image_size=IMAGE,
            patch_size=PATCH,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        root / "clip"
    )
    projector = {
        "model.mm_projector.0.weight": torch.randn(64, 32) * 0.1,
        "model.mm_projector.0.bias": torch.randn(64) * 0.1,
        "model.mm_projector.2.weight": torch.randn(64, 64) * 0.1,
        "model.mm_projector.2.bias": torch.randn(64) * 0.1,
    }
    torch.save(projector, root / "mm_projector.bin")
    return {"llama": root / "llama", "clip": root / "clip", "mm_projector": root / "mm_projector.bin"}


def write_config(root: Path, parts: dict, shards: Path) -> Path:
    cfg = root / "tiny.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        run_dir: {root}/run
        seed: 0
        stages: [projector, sft, export]
        model:
          source: parts
          llama_dir: {parts["llama"]}
          clip_dir: {parts["clip"]}
          mm_projector: {parts["mm_projector"]}
          vision_feature_layer: -2
          freeze_vision: true
        atp:
          atp_layers: [1, 3]
          spatial_strides: [2, 3]
          target_tokens: {LV * 0.5}
          threshold_hidden: 32
        data:
          shards: {shards}
          batch_size: {BATCH}
          num_workers: 0
          shuffle_buffer: 16
          max_length: 256
        train:
          max_steps: {STEPS}
          lr_lm: 1.0e-3
          lr_atp: 1.0e-2
          warmup_ratio: 0.2
          checkpoint_every: 2
          image_every: 3
        export:
          dtype: float32
        """)
    )
    return cfg


def build(root: Path) -> dict:
    """Parts, shards and config under `root`: {"root", "parts", "config"}."""
    from shards import synthetic

    root.mkdir(parents=True, exist_ok=True)
    parts = make_parts(root)
    opt = synthetic.Options(image_size=64, turns=2)  # the processor resizes to IMAGE
    synthetic.write(str(root / "shards"), "train", SAMPLES, 0, opt, maxcount=16, progress=False)
    cfg = write_config(root, parts, root / "shards")
    return {"root": root, "parts": parts, "config": cfg}


def reversed_roles_shard(path: Path, n: int = 16) -> Path:
    """`n` records whose conversation starts with the assistant: every sample is bad."""
    import json

    import webdataset as wds

    path.mkdir(parents=True, exist_ok=True)
    conv = json.dumps({"conversations": [{"from": "gpt", "value": "yes"}, {"from": "human", "value": "red?"}]})
    with wds.TarWriter(str(path / "bad-000000.tar"), encoder=False) as w:
        for i in range(n):
            w.write({"__key__": f"bad{i}", "json": conv.encode()})
    (path / "sizes.json").write_text(json.dumps({"bad-000000.tar": n}))
    return path
