"""ATP-LLaVA: adaptive visual-token pruning modules inside LLaVA's Llama (docs/METHOD.md)."""

from .configuration_atp_llava import AtpLlavaConfig
from .cost import layer_flops_exact, layer_flops_paper, model_costs
from .modeling_atp_llava import CACHE_KW, AtpLlavaForConditionalGeneration, AtpLlavaOutput

__all__ = [
    "CACHE_KW",
    "AtpLlavaConfig",
    "AtpLlavaForConditionalGeneration",
    "AtpLlavaOutput",
    "model_costs",
    "layer_flops_paper",
    "layer_flops_exact",
]
