"""The stages of one private step, in the order data flows through them.

    collect        hooks on the LoRA (and dense) layers keep each module's input and output gradient
    per_example    per-example tangent blocks (PRISM) or factor / dense gradients (naive)
    clip           one global clip per example, at the end of every backward pass (micro-batch)
    reduce         clipped sums added up over ranks (torch.distributed)
    noise          Gaussian noise in the tangent space, std = sigma C / b (b the EXPECTED batch size)
    precondition   DP-aware r x r second moments with the noise floor (adaptive step)
                   (shrink: the optional momentum shrinkage by the moment's noise share)
    retract        back to rank r in balanced factors
    account        the step recorded with the accountant; the budget checked before it

`units` holds each module's buffers between the stages. The optimizers (prism.optim) run the
stages; prism.functional composes noise -> precondition -> retract for one module.
"""
