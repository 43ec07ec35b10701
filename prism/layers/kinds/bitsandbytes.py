"""bitsandbytes' quantized base layers (QLoRA): Linear4bit (nf4, fp4) and Linear8bitLt.

Their weight is stored quantized (uint8 / int8 data with a quantization state), so no init may
rewrite it in place, and the dense weight they apply is read by running the layer on the identity
(on CPU bitsandbytes repacks the stored weight after the first forward pass, so dequantising the
stored data does not give it; in evaluation mode the CPU path switches to an inference kernel
without a backward, after which no gradient reaches the layers below: train the model in training
mode from the start, or load it again). The private step itself never reads the base: the per-example
blocks need only the LoRA path's input and output gradient. Registered by import path, so prism
does not import bitsandbytes.
"""

import torch
from torch import nn

from ..registry import BaseKind, register_base_kind


def _applied_weight(layer: nn.Module) -> torch.Tensor:
    """W (out, in) with layer(x) = x W^T + bias, read as layer(I) - bias (in training mode: an
    evaluation-mode pass on CPU repacks the weight for an inference kernel that has no backward)."""
    was_training = layer.training
    layer.train()
    try:
        return _probe(layer)
    finally:
        layer.train(was_training)


def _probe(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        eye = torch.eye(layer.in_features, device=layer.weight.device,
                        dtype=getattr(layer, "compute_dtype", None) or torch.float32)
        out = layer(eye)
        if layer.bias is not None:
            out = out - layer.bias.to(out.dtype)
    return out.T


def _kind(name: str) -> BaseKind:
    return BaseKind(name=name, fan_in_fan_out=False, may_rewrite_base=False,
                    features=lambda layer: (layer.in_features, layer.out_features), applied_weight=_applied_weight)


register_base_kind("bitsandbytes.nn.modules.Linear4bit", _kind("bitsandbytes Linear4bit"))
register_base_kind("bitsandbytes.nn.modules.Linear8bitLt", _kind("bitsandbytes Linear8bitLt"))
