"""Export a trained adapter that loads on the ORIGINAL base model.

PRISM needs full-rank initial factors, and the usual way to get them without changing the
model's output moves part of the base weight into the adapter: PiSSA/OLoRA (peft) and
`prism.init_balanced_lora` replace W0 by W_res = W0 - s A0 B0^T. An adapter saved as is only
works on W_res. With the initial factors kept, the update relative to W0 is

    W_res + s A B^T - W0 = s (A B^T - A0 B0^T) = s [A, A0] [B, -B0]^T,

a plain LoRA adapter of rank 2r with the same scaling s (lora_alpha scaled with r). Layers
trained in full (`modules_to_save`, e.g. a classifier head) are saved unchanged.

    model.save_pretrained("initial")                    # before training (no privacy cost)
    ...train...
    prism.export.save_adapter_for_base(model, "adapter", initial_adapter_dir="initial")
    PeftModel.from_pretrained(original_base_model, "adapter")
"""

from __future__ import annotations

import copy
import math
import os

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
MUTATED_BASE_FLAG = "prism_mutated_base"  # set on the model by init_balanced_lora(compensate_base=True)


def mutates_base(model) -> bool:
    """True if the active adapter's init may have changed the base weights (PiSSA, OLoRA, CorDA,
    LoRA-GA, LoftQ, ...: anything but the inits known to leave them alone), or init_balanced_lora did."""
    init = getattr(_active_config(model), "init_lora_weights", True)
    return getattr(model, MUTATED_BASE_FLAG, False) or not any(init is k or init == k for k in BASE_PRESERVING_INITS)


def keep_initial_adapter(model, directory: str) -> None:
    """Save the initial adapter to `directory`, or, if one is there (a resumed run), check that it
    is this model's initialisation: the same Z0 = lora_B lora_A for every LoRA layer.

    Raises:
        ValueError: the directory holds another initialisation (a stale run, or a resumed run whose
            init differs; its base weights W_res would differ too and the checkpoint would not fit).
    """
    weights = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.exists(weights):
        model.save_pretrained(directory)
        return
    saved = load_file(weights)
    current = get_peft_model_state_dict(model)
    for name, lora_A in current.items():
        if "lora_A" not in name:
            continue
        name_B = name.replace("lora_A", "lora_B")
        if name not in saved or name_B not in saved:
            raise ValueError(f"{directory} holds the initial adapter of another model (no {name}). Remove it for a "
                             "new run.")
        Z_now = current[name_B].detach().cpu().double() @ lora_A.detach().cpu().double()
        Z_saved = saved[name_B].double() @ saved[name].double()
        if not torch.allclose(Z_now, Z_saved, rtol=1e-4, atol=1e-6 * Z_now.abs().max()):
            raise ValueError(f"{directory} holds the initial adapter of a different initialisation ({name} differs). "
                             "Remove it for a new run; to resume, initialise the model exactly as the first run did.")


def save_adapter_for_base(model, save_directory: str, initial_adapter_dir: str | None = None) -> None:
    """Save the active adapter so that it loads with `PeftModel.from_pretrained` on the original
    base model and reproduces `model`'s outputs.

    Args:
        model: the trained peft model (one active LoRA adapter).
        save_directory: where to write adapter_config.json and adapter_model.safetensors.
        initial_adapter_dir: the adapter saved with `model.save_pretrained` right after
            initialisation, required when the init mutated the base (PiSSA, OLoRA,
            init_balanced_lora with compensate_base).
    """
    config = copy.deepcopy(_active_config(model))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    if mutates_base(model):
        if initial_adapter_dir is None:
            raise ValueError("this adapter's init moved part of the base weights into it; pass initial_adapter_dir="
                             "the directory where model.save_pretrained(...) stored it before training.")
        state = _relative_to_base(state, load_file(os.path.join(initial_adapter_dir, "adapter_model.safetensors")))
        config.r *= 2
        config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
        for pattern in ("rank_pattern", "alpha_pattern"):
            if getattr(config, pattern, None):
                raise ValueError(f"exporting an adapter with a {pattern} is not supported")
    config.init_lora_weights = True
    config.inference_mode = True
    os.makedirs(save_directory, exist_ok=True)
    config.save_pretrained(save_directory)
    save_file(state, os.path.join(save_directory, "adapter_model.safetensors"), metadata={"format": "pt"})


def _relative_to_base(trained: dict, initial: dict) -> dict:
    """lora_A -> [A_t^T; A_0^T] (2r, n) rows, lora_B -> [B_t, -B_0] (m, 2r) columns (peft's naming:
    lora_B.weight is our A, lora_A.weight our B^T); other tensors unchanged."""
    out = {}
    for name, value in trained.items():
        if "lora_A" in name or "lora_B" in name:
            if name not in initial:
                raise ValueError(f"the initial adapter has no {name}; was it saved from this model?")
            start = initial[name].to(value.dtype)
            out[name] = torch.cat([value, start], 0) if "lora_A" in name else torch.cat([value, -start], 1)
        else:
            out[name] = value
    return out


def _active_config(model):
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    if not isinstance(configs, dict) or not isinstance(active, str) or active not in configs:
        raise ValueError("expected a peft model with one active adapter (peft.get_peft_model).")
    return configs[active]
