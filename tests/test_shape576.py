"""LLaVA-1.5's training shape (pipeline/configs/shape576.yaml): 576 visual tokens, 2048-token
sequences, 16 layers, ATP at three points, gradient checkpointing over the soft masks.

The default suite checks the pieces: checkpointing leaves the gradients of a soft-mask forward
unchanged and drops its saved activations, and one forward + backward at the full shape gives a
finite loss whose gradient reaches every ATP module. The run itself (2-process ZeRO-3, 200
steps, 1.5 h or more on a 2-core CPU) is `-m slow`; docs/RESULTS.md has its numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_models import make_batch, saved_bytes, tiny_atp
from tiny_pipeline import launch

CONFIG = "pipeline/configs/shape576.yaml"


def _set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def test_gradient_checkpointing_keeps_soft_mask_gradients_and_drops_activations():
    _, model = tiny_atp(atp_layers=(1, 3, 5), llava_kw=dict(layers=6))
    model.train()
    batch = make_batch([3, 5], [7, 4], answers=[2, 3])
    losses, grads, saved = {}, {}, {}
    for on in (False, True):
        _set_checkpointing(model, on)
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        losses[on] = out.loss.detach()
        grads[on] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        saved[on] = saved_bytes(model, batch)
    assert torch.equal(losses[False], losses[True])
    assert grads[False].keys() == grads[True].keys() and any(n.startswith("atp_modules.") for n in grads[True])
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-6, atol=1e-7, msg=name)
    # the layers' activations (softmax of the masked attention included) are recomputed, not kept
    assert saved[True] < saved[False] / 4, saved


def test_one_step_at_576_tokens_and_2048_length(tmp_path):
    """The config's own model and data (336 px images, filler context), one micro-batch, forward
    + backward with checkpointing: the shape the run trains at, without the launcher."""
    from model import AtpLlavaForConditionalGeneration
    from pipeline.core.config import load_config
    from pipeline.data.loader import build_loader
    from pipeline.train.build import _scratch_parts
    from pipeline.train.trainer import _model_inputs
    from shards import synthetic

    run = load_config(CONFIG, [f"data.shards={tmp_path}", "data.num_workers=0", "data.shuffle_buffer=0"], files=False)
    args = dict(zip(run.synthetic.args[::2], run.synthetic.args[1::2]))
    opt = synthetic.Options(image_size=run.synthetic.image_size, context_words=int(args["--context-words"]))
    synthetic.write(str(tmp_path), "train", 2, 0, opt, progress=False)
    config, tok, proc = _scratch_parts(run)
    assert config.num_visual_tokens == 576 and config.text_config.num_hidden_layers >= 16
    torch.manual_seed(0)
    model = AtpLlavaForConditionalGeneration(config).train()
    _set_checkpointing(model, run.model.gradient_checkpointing)
    batch = next(iter(build_loader(run.data, tok, proc, image_token_id=config.image_token_id,
                                   num_image_tokens=config.num_visual_tokens)))  # fmt: skip
    L = batch["input_ids"].shape[1]
    assert 1900 < L <= run.data.max_length == 2048, L
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 576
    out = model(**_model_inputs(batch, "cpu", torch.float32))
    assert math.isfinite(float(out.loss))
    assert 0 < float(out.visual_tokens.float().mean()) < 576  # the soft masks prune something
    out.loss.backward()
    for k in range(len(config.atp_layers)):
        g = [p.grad for p in model.atp_modules[k].parameters()]
        assert all(x is not None and torch.isfinite(x).all() for x in g), k
        assert sum(float(x.abs().sum()) for x in g) > 0, f"no gradient reaches ATP module {k}"


@pytest.mark.slow
def test_shape576_run(tmp_path):
    """The run of docs/RESULTS.md ("The 576-token run"): 2-process ZeRO-3, fp32 on a CPU without
    native bf16. Every step logged with a finite loss at sequence length near 2048, the next-token
    loss falls, N_bar is below Lv, and the memory metrics are there."""
    steps = 200
    launch(
        ["run", CONFIG, f"run_dir={tmp_path}", "train.precision=fp32", f"train.max_steps={steps}"],
        timeout=4 * 3600,
    )
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss/total"]) and r["train/step_skipped"] == 0 for r in rows)
    assert min(r["data/max_seq_len"] for r in rows) > 1900
    ntp = [r["loss/ntp"] for r in rows]
    assert sum(ntp[-20:]) / 20 < sum(ntp[:20]) / 20
    assert all(0 < r["atp/n_bar"] < 576 for r in rows)
    assert all(r["mem/peak_rss_above_baseline_mb"] > 0 for r in rows)
