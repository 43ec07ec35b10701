"""prism's private optimizers: a shared shell (base) over the pipeline stages, and two kinds of update.

- base.DPLoRAOptimizer: builds the pipeline on a peft model and runs one private step per `step()`;
- prism.PRISM: tangent-space clipping and noise, DP-aware adaptive step, retraction (the method);
- naive.NaiveDPLoRA: DP-SGD / DP-AdamW on the factors (the baseline; FFA-LoRA with lora_A frozen);
- guards, groups, checkpoint, updates: refusals, parameter groups, state_dict, the final write.
"""

from .base import DPLoRAOptimizer
from .naive import NaiveDPLoRA
from .prism import PRISM

__all__ = ["DPLoRAOptimizer", "NaiveDPLoRA", "PRISM"]
