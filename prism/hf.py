"""`prism.hf`, the short public path of the Hugging Face Trainer integration (prism.integrations.hf):

    prism.hf.make_private(trainer)
    trainer.train()
    prism.hf.save_adapter_for_base(trainer, "adapter")
"""

from .integrations.hf import (UNNOISED_LOG_KEYS, PerExampleLoss, PrivacyCallback, default_per_example_loss,
                              make_private, per_example_compute_loss, save_adapter_for_base,
                              sft_per_example_loss)

__all__ = ["make_private", "save_adapter_for_base", "default_per_example_loss", "per_example_compute_loss",
           "sft_per_example_loss", "PrivacyCallback", "PerExampleLoss", "UNNOISED_LOG_KEYS"]
