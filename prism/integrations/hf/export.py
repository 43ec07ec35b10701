"""Adapters of a Trainer made private that load on the ORIGINAL base model (through prism.export):
the initial adapter kept at make_private, the trained one saved relative to it."""

from __future__ import annotations

import os

from ... import export  # prism.export: the same for a model outside a Trainer
from .callbacks import PrivacyCallback

INITIAL_ADAPTER = "prism_initial_adapter"  # the folder in output_dir that holds the initial adapter


def keep_initial_adapter(trainer, callback: PrivacyCallback) -> None:
    """With a PiSSA-style init (part of W0 moved into the adapter), save the initial adapter in
    output_dir/prism_initial_adapter and note it on the callback; otherwise do nothing."""
    if not export.mutates_base(trainer.model):
        return
    callback.initial_adapter_dir = os.path.join(trainer.args.output_dir, INITIAL_ADAPTER)
    if trainer.args.should_save:  # one writer per output directory
        export.keep_initial_adapter(trainer.model, callback.initial_adapter_dir)


def save_adapter_for_base(trainer, save_directory: str) -> None:
    """Save the trained adapter for the ORIGINAL base model (see prism.export); with a PiSSA-style
    init it uses the initial adapter make_private kept in output_dir/prism_initial_adapter."""
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, PrivacyCallback)), None)
    if callback is None:
        raise ValueError("this trainer was not made private with prism.hf.make_private.")
    export.save_adapter_for_base(trainer.model, save_directory, callback.initial_adapter_dir)
