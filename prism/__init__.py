"""prism: differentially private LoRA fine-tuning in the tangent space of the rank-r manifold."""

from .init import init_balanced_lora
from .layers import find_trainables
from .losses import per_example_causal_lm_loss
from .naive import NaiveDPLoRA
from .optimizer import PRISM

__all__ = ["PRISM", "NaiveDPLoRA", "init_balanced_lora", "find_trainables", "per_example_causal_lm_loss"]
__version__ = "0.1.0"
