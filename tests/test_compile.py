"""The decoder layers and the pruning steps under torch.compile (`compile_layers`, `compile_pruning`:
dynamic shapes, inductor on CPU) against eager: the same logits and kept counts, and new lengths /
kept counts reuse the compiled graphs."""

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from pipeline.eval.opcount import KERNEL_PROFILE, count_launches

from tiny_models import make_batch, tiny_atp

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler")

# three batches of three: other text lengths and other images, so other kept counts per sample
BATCHES = [([2, 5, 3], [6, 3, 4], 1), ([4, 1, 2], [2, 7, 5], 2), ([3, 3, 6], [5, 5, 1], 3)]


def prompts():
    out = []
    for pre, suf, seed in BATCHES:
        b = make_batch(pre, suf, padding="left", seed=seed)
        out.append({k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    return out


def eager_runs(layout):
    """The tiny ATP model in eval mode on `layout`, the prompts, and its eager outputs on them."""
    _, m = tiny_atp()
    m.eval()
    m.config.hard_layout = layout
    batches = prompts()
    with torch.no_grad():
        return m, batches, [m(**b) for b in batches]


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_compiled_layers_equal_eager_and_new_kept_counts_do_not_recompile(layout):
    m, batches, ref = eager_runs(layout)
    with torch.no_grad():
        kept = {tuple(r.visual_tokens[:, -1].tolist()) for r in ref}
        assert len(kept) == len(batches)  # the batches really keep other counts
        torch._dynamo.reset()
        counters.clear()
        m.compile_layers()
        out = [m(**batches[0])]
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0  # the layers did run compiled
        with torch._dynamo.config.patch(error_on_recompile=True):  # other lengths and counts: no new graph
            out += [m(**b) for b in batches[1:]]
        m.compile_layers(False)
    assert counters["stats"]["unique_graphs"] == graphs
    for b, r, o in zip(batches, ref, out):
        assert torch.equal(o.visual_tokens, r.visual_tokens)
        live = b["attention_mask"].bool()
        # fp32: inductor fuses and reorders the reductions (RMSNorm, softmax), so not bit-equal
        torch.testing.assert_close(o.logits[live], r.logits[live], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_compiled_pruning_steps_equal_eager_with_fewer_launches_and_no_recompile(layout):
    """Each pruning point is two graphs (split at its host read of the kept lengths); a new batch of
    other lengths and kept counts compiles nothing new, keeps the eager counts and issues fewer host
    launches (aten ops and fused kernels) than the eager steps."""
    m, batches, ref = eager_runs(layout)
    with torch.no_grad():
        eager = count_launches(lambda: m(**batches[1]))
        torch._dynamo.reset()
        counters.clear()
        m.compile_pruning(options=KERNEL_PROFILE)
        try:
            out = [m(**batches[0])]
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 2 * len(m.config.atp_layers)  # each point: before and after its host read
            with torch._dynamo.config.patch(error_on_recompile=True):
                out += [m(**b) for b in batches[1:]]
            compiled = count_launches(lambda: m(**batches[1]))
        finally:
            m.compile_pruning(False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert compiled["kernels"] > 0 and compiled["launches"] < eager["launches"]
    for b, r, o in zip(batches, ref, out):
        assert torch.equal(o.visual_tokens, r.visual_tokens)
        assert torch.equal(o.atp_info["keep"], r.atp_info["keep"])
        live = b["attention_mask"].bool()
        torch.testing.assert_close(o.logits[live], r.logits[live], atol=1e-5, rtol=1e-5)


def test_compiled_layers_generate_the_eager_tokens():
    _, m = tiny_atp()
    m.eval()
    m.config.hard_layout = "packed"
    b = prompts()[0]
    eager = m.generate(**b, max_new_tokens=4, do_sample=False)
    torch._dynamo.reset()
    m.compile_layers()
    try:
        compiled = m.generate(**b, max_new_tokens=4, do_sample=False)
    finally:
        m.compile_layers(False)
    assert torch.equal(compiled, eager)


def test_compiled_decode_of_more_layers_than_dynamo_recompile_limit_stays_compiled():
    """Each layer reads its own cache layer by index, so with a cache each layer is its own graph (and
    another once its cache holds keys): a 12-layer model (dynamo's default limit is 8 graphs in all)
    generates the eager tokens with every layer compiled (none sent back to eager at the limit), and a
    second prompt of other lengths and kept counts compiles nothing new. Dynamo's own `eager` backend:
    the limit and the guards are dynamo's, inductor's code generation would only add minutes."""
    _, m = tiny_atp(llava_kw=dict(layers=12), atp_layers=(2, 6))
    m.eval()
    m.config.hard_layout = "packed"
    first, second = prompts()[:2]
    eager = [m.generate(**b, max_new_tokens=3, do_sample=False) for b in (first, second)]
    torch._dynamo.reset()
    counters.clear()
    m.compile_layers(backend="eager")
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            out = [m.generate(**first, max_new_tokens=3, do_sample=False)]
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 8  # past dynamo's default limit
            with torch._dynamo.config.patch(error_on_recompile=True):
                out.append(m.generate(**second, max_new_tokens=3, do_sample=False))
    finally:
        m.compile_layers(False)
        m._compiled_layers = None  # the next test compiles with its own backend
    assert counters["stats"]["unique_graphs"] == graphs
    for o, e in zip(out, eager):
        assert torch.equal(o, e)
