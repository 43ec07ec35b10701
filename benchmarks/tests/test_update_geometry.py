"""benchmarks.update_geometry: where a fine-tune moved W relative to W0's principal subspaces."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchmarks.update_geometry import snapshot, update_geometry


def _model(init="pissa"):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 16, bias=False))
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"], init_lora_weights=init))


def test_the_principal_share_is_one_inside_zero_outside_and_the_energy_fraction_between():
    model = _model()
    before = snapshot(model)
    with torch.no_grad():  # grow the singular values: Delta W = U (.) V^T, inside the principal subspaces
        layer = model.base_model.model[0]
        layer.lora_B["default"].weight.mul_(1.5)
    geometry = update_geometry(model, before)
    assert geometry["all"]["principal_share"] == pytest.approx(1.0, abs=1e-9)
    assert geometry["all"]["relative_update"] > 0

    model = _model(init=True)  # peft's default: B = 0, so W0 is the base weight and Delta W = B_1 A_1
    before = snapshot(model)
    s = before["base_model.model.0"]
    u = (torch.eye(16, dtype=torch.float64) - s["U"] @ s["U"].T) @ torch.randn(16, dtype=torch.float64)
    v = (torch.eye(24, dtype=torch.float64) - s["V"] @ s["V"].T) @ torch.randn(24, dtype=torch.float64)
    layer = model.base_model.model[0]
    with torch.no_grad():  # Delta W = u v^T with u, v orthogonal to W0's top-2 singular vectors
        layer.lora_B["default"].weight.zero_()[:, 0] = u.float()
        layer.lora_A["default"].weight[0] = v.float()
    assert update_geometry(model, before)["0"]["principal_share"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # add a component along W0's top left singular vector: its share of the energy
        layer.lora_B["default"].weight[:, 1] = s["U"][:, 0].float()
    delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
    inside = (s["U"][:, :1] @ layer.lora_A["default"].weight[1:].double()).square().sum()
    expected = (inside / delta.square().sum()).item()
    assert update_geometry(model, before)["all"]["principal_share"] == pytest.approx(expected, rel=1e-5)


def test_no_update_reports_nothing_and_a_transposed_base_is_refused():
    model = _model(init=True)
    assert update_geometry(model, snapshot(model)) == {}
    layer = model.base_model.model[0]
    layer.get_base_layer().weight = nn.Parameter(layer.get_base_layer().weight.T.clone(), requires_grad=False)
    with pytest.raises(ValueError, match="not stored"):
        snapshot(model)


def test_start_overlap_is_one_for_an_exact_pissa_start_and_none_for_peft_default():
    from benchmarks.update_geometry import start_overlap

    model = _model(init="pissa")  # peft's exact-SVD PiSSA: the adapter's columns are W0's top-2 singular vectors
    assert start_overlap(snapshot(model)) == pytest.approx(1.0, abs=1e-6)
    assert start_overlap(snapshot(_model(init=True))) is None
    model = _model(init=True)
    with torch.no_grad():  # a small random full-rank start (W0 stays near the base): far from its top subspace
        model.base_model.model[0].lora_B["default"].weight.normal_(std=1e-4)
    assert start_overlap(snapshot(model)) < 0.9
