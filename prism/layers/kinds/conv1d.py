"""GPT-2's Conv1D base layers (transformers): a linear layer whose weight is stored (in, out).

peft adapts them with fan_in_fan_out=True; the applied (out, in) weight is the transpose.
"""

from transformers.pytorch_utils import Conv1D

from ..registry import BaseKind, register_base_kind

CONV1D = BaseKind(name="GPT-2 Conv1D", fan_in_fan_out=True, may_rewrite_base=True,
                  features=lambda layer: tuple(layer.weight.shape),
                  applied_weight=lambda layer: layer.weight.T)

register_base_kind(Conv1D, CONV1D)
