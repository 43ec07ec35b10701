"""benchmarks.methods' model surgery: the gauge re-factoring keeps Z and freezing goes by parameter name."""

import torch
from peft import LoraConfig, get_peft_model

from benchmarks import methods


def _adapter():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    return get_peft_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"))


def _factors(model):
    layer = model.base_model.model[0]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def test_refactor_scales_the_factors_by_c_and_1_over_c_and_keeps_their_product():
    model = _adapter()
    a, b = (w.detach().clone() for w in _factors(model))
    methods.refactor(model, 10.0)
    new_a, new_b = _factors(model)
    assert new_a.requires_grad and new_b.requires_grad
    torch.testing.assert_close(new_b, 10.0 * b)
    torch.testing.assert_close(new_a, a / 10.0)
    torch.testing.assert_close(new_b @ new_a, b @ a)


def test_freeze_stops_gradients_of_the_named_factor_only():
    model = _adapter()
    methods.freeze(model, ".lora_A.")
    a, b = _factors(model)
    assert not a.requires_grad and b.requires_grad
