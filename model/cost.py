"""Cost accounting (METHOD sec 8): FLOPs per layer from its token count, KV-cache bytes, ATP's own cost.

`model_costs(visual_per_layer, text_len, config)` turns per-layer visual-token counts (what
`out.visual_tokens` reports) into the numbers the report compares against the unpruned model.
"""

from __future__ import annotations


def layer_flops_paper(L: float, d: int, m: int) -> float:
    """Paper Eq. 15: 4 L d^2 + 2 L^2 d + 2 L d m (its convention, kept for comparability)."""
    return 4 * L * d * d + 2 * L * L * d + 2 * L * d * m


def layer_flops_exact(L: float, d: int, m: int, heads: int, kv_heads: int, head_dim: int) -> float:
    """Floating-point operations (2 per multiply-add) of a Llama layer with GQA and SwiGLU,
    full (non-causal-halved) attention, norms and activations omitted."""
    proj = 2 * L * d * head_dim * (2 * heads + 2 * kv_heads)  # q, o + k, v
    attn = 2 * 2 * L * L * heads * head_dim  # QK^T and AV
    mlp = 2 * 3 * L * d * m  # gate, up, down
    return proj + attn + mlp


def atp_module_flops(lv: int, text_len: float, seq_len: float, heads: int, head_dim: int, hidden: int) -> float:
    """One ATP module: the block-wise score logits (Lv x Lv and query-text x L) and the threshold MLP."""
    scores = 2 * heads * head_dim * (lv * lv + text_len * seq_len)
    mlp = 2 * (2 * lv * hidden) + 2 * 2 * hidden
    return scores + mlp


def model_costs(visual_per_layer, text_len: float, config, kv_bytes_per_value: int = 2) -> dict:
    """Prefill cost of one sample whose layer j attends over `visual_per_layer[j]` visual tokens."""
    tc = config.text_config
    d, m = tc.hidden_size, tc.intermediate_size
    heads, kv = tc.num_attention_heads, tc.num_key_value_heads
    hd = getattr(tc, "head_dim", None) or d // heads
    lengths = [text_len + float(v) for v in visual_per_layer]
    atp_layers = list(getattr(config, "atp_layers", []))
    lv = config.num_visual_tokens
    atp = sum(
        atp_module_flops(visual_per_layer[i - 1], text_len, lengths[i - 1], heads, hd, config.threshold_hidden)
        for i in atp_layers
        if getattr(config, "pruning", "none") != "none"
    )
    return {
        "flops_paper": sum(layer_flops_paper(L, d, m) for L in lengths),
        "flops_exact": sum(layer_flops_exact(L, d, m, heads, kv, hd) for L in lengths),
        "kv_cache_bytes": sum(2 * L * kv * hd * kv_bytes_per_value for L in lengths),
        "atp_flops": atp,
        "n_bar": sum(visual_per_layer) / len(visual_per_layer),
        "lv": lv,
    }
