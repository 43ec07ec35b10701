"""prism: differentially private LoRA fine-tuning in the tangent space of the rank-r manifold."""

from . import audit
from .accounting import PrivacyAccountant, PrivacyBudgetExceeded, calibrate_noise_multiplier
from .init import init_balanced_lora
from .layers import find_trainables
from .losses import per_example_causal_lm_loss
from .optim import NaiveDPLoRA, PRISM
from .sharding import shard_model
from .sampling import EmptyBatch, NonPoissonSampling, PoissonBatchSampler, micro_batches, poisson_data_loader

__all__ = ["PRISM", "NaiveDPLoRA", "PrivacyAccountant", "PrivacyBudgetExceeded", "calibrate_noise_multiplier",
           "PoissonBatchSampler", "poisson_data_loader", "micro_batches", "EmptyBatch", "NonPoissonSampling", "init_balanced_lora",
           "find_trainables", "per_example_causal_lm_loss", "audit", "shard_model"]
__version__ = "0.1.0"
