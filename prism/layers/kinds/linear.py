"""torch.nn.Linear base layers: weight (out, in), full precision, may be rewritten by an init."""

from torch import nn

from ..registry import BaseKind, register_base_kind

LINEAR = BaseKind(name="nn.Linear", fan_in_fan_out=False, may_rewrite_base=True,
                  features=lambda layer: (layer.in_features, layer.out_features),
                  applied_weight=lambda layer: layer.weight)

register_base_kind(nn.Linear, LINEAR)
