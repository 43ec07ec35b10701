"""The callback that keeps the Trainer and the privacy bookkeeping in step: steps counted alike,
the budget enforced, epsilon logged, unnoised counts dropped from the logs, the sampler resumed."""

from __future__ import annotations

import logging
import warnings

from transformers import TrainerCallback

from ...optim.base import DPLoRAOptimizer
from ...accounting import PrivacyBudgetExceeded
from ...sampling import PoissonBatchSampler
from .losses import FirstBatchProbe

logger = logging.getLogger(__name__)

# Trainer log entries computed from the private batches without noise (batch sizes, token counts),
# and SFTTrainer's training metrics (make_private's loss never records them; dropped should they appear)
UNNOISED_LOG_KEYS = ("grad_norm", "total_flos", "num_input_tokens_seen", "train_tokens_per_second",
                     "num_tokens", "entropy", "mean_token_accuracy", "aux_loss")


class PrivacyCallback(TrainerCallback):
    """Keeps the Trainer and the privacy bookkeeping in step (added by make_private)."""

    def __init__(self, optimizer: DPLoRAOptimizer, sampler: PoissonBatchSampler,
                 probe: FirstBatchProbe | None = None):
        self.optimizer = optimizer
        self.sampler = sampler
        self.probe = probe
        self.initial_adapter_dir: str | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        restored = self.optimizer.restore_parameters()
        if restored:
            logger.info("prism: %d parameters replaced while loading the checkpoint were put back", restored)
        self._check_in_step(state, "at the start of training (after loading any checkpoint)")
        planned = self.optimizer.plan.steps
        if planned is not None and state.max_steps > planned:
            raise ValueError(f"the Trainer will run {state.max_steps} steps but the optimizer's noise was calibrated "
                             f"for {planned}; set max_steps <= {planned}.")
        if not self.optimizer.budget_allows_another_step():
            raise PrivacyBudgetExceeded(f"the privacy budget max_epsilon={self.optimizer.plan.max_epsilon} is spent "
                                        f"({self.optimizer.privacy_spent()[0]:.4g}); training cannot continue.")
        self._drop_unfinished_step()
        self.sampler.next_step = state.global_step  # a seeded sampler draws what the uninterrupted run drew

    def on_train_end(self, args, state, control, **kwargs):
        if self.probe is not None and not self.probe.done:
            warnings.warn("the one-off check that rows are examples (check_examples) never ran: no training "
                          "micro-batch on this process had 2 or more examples. Run optimizer.check_examples on a "
                          "batch yourself.", UserWarning, stacklevel=2)

    def on_step_begin(self, args, state, control, **kwargs):
        self._drop_unfinished_step()

    def _drop_unfinished_step(self) -> None:
        """Clipped sums of a logical step that never reached optimizer.step() (an exception, an
        early stop between micro-batches) must not join the next step: its examples may be drawn again."""
        if self.optimizer.stats.backward_passes:
            warnings.warn("prism: discarding the clipped gradients of an unfinished step", RuntimeWarning, stacklevel=2)
            self.optimizer.zero_grad()

    def on_step_end(self, args, state, control, **kwargs):
        self._check_in_step(state, "after a step")
        if not self.optimizer.budget_allows_another_step():
            logger.warning("prism: stopping, another step would exceed max_epsilon=%s", self.optimizer.plan.max_epsilon)
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        extra = {"epsilon": self.optimizer.privacy_spent()[0]}
        for entry in [logs] + ([state.log_history[-1]] if state.log_history else []):
            for key in UNNOISED_LOG_KEYS:
                entry.pop(key, None)
            entry.update(extra)

    def _check_in_step(self, state, when: str) -> None:
        if self.optimizer.steps_taken != state.global_step:
            raise RuntimeError(
                f"the optimizer has taken {self.optimizer.steps_taken} private steps but the Trainer is at step "
                f"{state.global_step} {when}; the accountant would not match the training. Resume from a "
                "checkpoint saved with its optimizer state (do not set save_only_model=True), and build a new "
                "optimizer and trainer for each new training run.")
