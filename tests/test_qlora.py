"""QLoRA: PRISM on bitsandbytes' quantized base layers (CPU here; the same test runs on a GPU).

The per-example blocks need only the LoRA path's input and output gradient, so a private step on a
4-bit (or 8-bit) base equals the step on a full-precision model holding the weights the quantized
layers apply, up to the precision the quantized path computes in (about 1% on bitsandbytes' CPU path).
"""

import tempfile
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

import prism
from helpers import make_batch, per_example_losses, tiny_base

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need bitsandbytes (pip install --no-deps bitsandbytes)")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
QUANTIZED = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def _quantized_and_reference(quantization: str, device: str = "cpu"):
    """A tiny Llama loaded with a quantized base on `device`, and an fp32 twin holding the weights its
    layers apply."""
    base, _ = tiny_base("llama", hidden=64)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(folder)
        try:
            quantized = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=BitsAndBytesConfig(**QUANTIZED[quantization]), dtype=torch.float32,
                device_map={"": device})
        except Exception as exc:  # bitsandbytes' CPU backend lacks some quantization types
            pytest.skip(f"bitsandbytes cannot load {quantization} on this device: {exc}")
    quantized.train()  # before any forward pass: on CPU an eval-mode pass switches to a kernel without backward
    reference = tiny_base("llama", hidden=64)[0].float().to(device)
    kinds = {}
    with torch.no_grad():
        for name, module in quantized.named_modules():
            kind = prism.layers.base_kind_of(module)
            if kind is not None and isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt):
                kinds[name] = kind
                reference.get_submodule(name).weight.copy_(kind.applied_weight(module))
    assert kinds, "no quantized layer was found"
    return quantized, reference, kinds


def _lora(model):
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=TARGETS,
                                            init_lora_weights=True))


ON_CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_a_private_step_on_a_quantized_base_equals_the_step_on_the_weights_it_applies(quantization, device):
    quantized, reference, kinds = _quantized_and_reference(quantization, device)
    assert {kind.name for kind in kinds.values()} <= {"bitsandbytes Linear4bit", "bitsandbytes Linear8bitLt"}
    models = [_lora(quantized), _lora(reference)]
    for model in models:  # the same uncompensated balanced init on both (a quantized base cannot be rewritten)
        prism.init_balanced_lora(model, scale=0.1, compensate_base=False, generator=torch.Generator().manual_seed(0))
    batch = {k: v.to(device) for k, v in make_batch("llama", b=4, seed=3).items()}
    results = []
    for model in models:
        opt = prism.PRISM(model, lr=0.05, noise_multiplier=0.0, max_grad_norm=1e6, expected_batch_size=4,
                          loss_reduction="sum")
        per_example_losses("llama", model, batch).sum().backward()
        norms = opt.stats.last_norms.clone()
        opt.step()
        factors = [p.detach().clone() for pair in opt.pairs for p in (pair.lora_A.weight, pair.lora_B.weight)]
        results.append((norms, factors))
    (norms_q, factors_q), (norms_r, factors_r) = results
    assert norms_r.min() > 0
    torch.testing.assert_close(norms_q, norms_r, rtol=0.05, atol=0)
    # LLM.int8 on a GPU also quantizes the activations (to int8, through fp16): not only the weights differ
    tolerance = 2e-2 if (quantization, device) == ("int8", "cuda") else 1e-3
    for got, want in zip(factors_q, factors_r):
        torch.testing.assert_close(got, want, rtol=0.05, atol=tolerance * want.abs().max().item())


def test_an_init_that_rewrites_a_quantized_base_is_refused():
    quantized, _, _ = _quantized_and_reference("nf4")
    model = _lora(quantized)
    with pytest.raises(ValueError, match="cannot compensate a bitsandbytes Linear4bit base weight in place"):
        prism.init_balanced_lora(model)
    with pytest.raises(ValueError, match="zero or rank-deficient"):  # peft's default init: lora_B = 0
        prism.PRISM(model, lr=0.05, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)


def test_a_quantized_layer_switched_to_its_inference_kernel_fails_loudly_instead_of_not_training():
    """On CPU, an evaluation-mode pass repacks a 4-bit layer for a kernel without backward: gradients of
    the layers below would silently vanish. prism refuses the step's backward with the cause named."""
    quantized, _, _ = _quantized_and_reference("nf4")
    model = _lora(quantized)
    prism.init_balanced_lora(model, scale=0.1, compensate_base=False, generator=torch.Generator().manual_seed(0))
    opt = prism.PRISM(model, lr=0.05, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    batch = make_batch("llama", b=4, seed=3)
    model.eval()
    with torch.no_grad():
        per_example_losses("llama", model, batch)
    model.train()
    if not getattr(quantized.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes build does not switch kernels in evaluation mode")
    with pytest.raises(RuntimeError, match="gradient reaching this module's output is undefined"):
        per_example_losses("llama", model, batch).sum().backward()
    assert opt.steps_taken == 0
