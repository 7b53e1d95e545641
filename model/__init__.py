"""ATP-LLaVA: adaptive visual-token pruning modules inside LLaVA's Llama (docs/METHOD.md).

The names below load on first use (PEP 562), so that a stdlib-only module such as
`model.atp_values` imports without torch or transformers (the pipeline's config check).
"""

import importlib

_HOMES = {
    "AtpLlavaConfig": ".configuration_atp_llava",
    "layer_flops_exact": ".cost",
    "layer_flops_paper": ".cost",
    "model_costs": ".cost",
    "CACHE_KW": ".modeling_atp_llava",
    "AtpLlavaForConditionalGeneration": ".modeling_atp_llava",
    "AtpLlavaOutput": ".modeling_atp_llava",
}
__all__ = list(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    globals()[name] = value
    return value
