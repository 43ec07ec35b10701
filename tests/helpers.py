"""Tiny peft models, padded batches, per-example losses and a brute-force float64 reference."""

from __future__ import annotations

import copy
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, grad
from torch.nn import functional as F
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments)
from transformers.utils import logging as hf_logging

from prism import per_example_causal_lm_loss
from prism.manifold import tangent_basis

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*PiSSA.*")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

VOCAB = 40
KINDS = ("bert", "llama", "gpt2")


def tiny_base(kind: str, *, seed: int = 0, hidden: int = 16, num_labels: int = 3):
    """A tiny random-init transformers model and the LoRA targets for it: "bert" (sequence
    classification), "llama" (causal LM) or "gpt2" (causal LM, Conv1D). No dropout anywhere."""
    torch.manual_seed(seed)
    if kind == "bert":
        base = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        lora = dict(target_modules=["query", "value"], task_type="SEQ_CLS")
    elif kind == "llama":
        base = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
        lora = dict(target_modules=["q_proj", "v_proj", "down_proj"])
    elif kind == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=0, eos_token_id=0))
        lora = dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    else:
        raise ValueError(kind)
    return base, lora


def tiny_model(kind: str, *, r: int = 2, init="pissa", seed: int = 0, dtype=torch.float64, hidden: int = 16,
               num_labels: int = 3):
    """tiny_base(kind) with LoRA of rank r on its attention (and MLP) projections."""
    base, lora = tiny_base(kind, seed=seed, hidden=hidden, num_labels=num_labels)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=init, **lora))
    return model.to(dtype)


def make_batch(kind: str, b: int, T: int = 7, seed: int = 0, num_labels: int = 3) -> dict:
    """Random tokens with right padding of varying length (every example keeps >= 2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, T), generator=g)
    lengths = torch.randint(2, T + 1, (b,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids = ids * mask
    if kind == "bert":
        labels = torch.randint(0, num_labels, (b,), generator=g)
    else:
        labels = torch.where(mask.bool(), ids, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def token_halves(n, seed):
    """Learnable: class 0 draws tokens from 1..23, class 1 from 17..39."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids = torch.randint(1, 24, (n, 8), generator=g) + 16 * labels[:, None]
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def select(batch: dict, index) -> dict:
    return {k: v[index] for k, v in batch.items()}


def per_example_losses(kind: str, model, batch: dict) -> torch.Tensor:
    """(b,) losses, each a function of its own example only."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if kind == "bert":
        return F.cross_entropy(out.logits, batch["labels"], reduction="none")
    return per_example_causal_lm_loss(out.logits, batch["labels"])


def lora_layers(model):
    """(lora_A, lora_B, layer) of every LoRA layer, in module order."""
    from peft.tuners.lora import LoraLayer
    return [(m.lora_A["default"], m.lora_B["default"], m) for m in model.modules() if isinstance(m, LoraLayer)]


def lora_Z(model) -> list[torch.Tensor]:
    """Z = lora_B.weight @ lora_A.weight of every LoRA layer (detached copies)."""
    return [(B.weight @ A.weight).detach().clone() for A, B, _ in lora_layers(model)]


def refactor(model, transform) -> None:
    """Replace each pair (A, B) by transform(A, B) (e.g. a gauge (A R, B R^-T)) in place."""
    with torch.no_grad():
        for lora_A, lora_B, _ in lora_layers(model):
            A, B = transform(lora_B.weight.clone(), lora_A.weight.T.clone())
            lora_B.weight.copy_(A)
            lora_A.weight.copy_(B.T)


def brute_force_gradients(kind: str, model, batch: dict):
    """Per-example gradients, one example at a time with torch.func.grad, on a hook-free copy.

    Returns (G, dense): G[k] is (b, m, n), dL_i/dZ for the k-th LoRA layer (= scaling * dL_i/dW0,
    transposed for Conv1D); dense maps each trainable non-LoRA parameter name to (b, ...) grads.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        module._forward_hooks.clear()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    layers = lora_layers(model)
    layer_names = {id(m): name for name, m in model.named_modules()}
    base_names = [layer_names[id(layer)] + ".base_layer.weight" for _, _, layer in layers]
    dense_names = [k for k, p in model.named_parameters() if p.requires_grad and "lora_" not in k]
    targets = {k: params[k] for k in base_names + dense_names}

    def loss(target_params, example):
        one = {k: v[None] for k, v in example.items()}
        return per_example_losses(kind, _Functional(model, {**params, **target_params}, buffers), one)[0]

    grads = [grad(loss)(targets, select(batch, i)) for i in range(batch["input_ids"].shape[0])]
    G = []
    for (_, _, layer), name in zip(layers, base_names):
        g = torch.stack([gi[name] for gi in grads])
        g = g.transpose(1, 2) if layer.fan_in_fan_out else g
        G.append(layer.scaling["default"] * g)
    return G, {k: torch.stack([gi[k] for gi in grads]) for k in dense_names}


class _Functional:
    def __init__(self, model, params, buffers):
        self.model, self.state = model, (params, buffers)

    def __call__(self, **kwargs):
        return functional_call(self.model, self.state, args=(), kwargs=kwargs)


def project(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense P_Z(G) = G - (I - P_A) G (I - P_B) for G (..., m, n)."""
    P_A = A @ torch.linalg.pinv(A)
    P_B = B @ torch.linalg.pinv(B)
    I_m = torch.eye(A.shape[0], dtype=G.dtype)
    I_n = torch.eye(B.shape[0], dtype=G.dtype)
    return G - (I_m - P_A) @ G @ (I_n - P_B)


def assemble(S, U, V, basis) -> torch.Tensor:
    """Dense tangent vector Q_A S Q_B^T + U Q_B^T + Q_A V^T."""
    return basis.Q_A @ S @ basis.Q_B.mT + U @ basis.Q_B.mT + basis.Q_A @ V.mT


def current_factors(optimizer, index: int):
    """(A, B, basis) as the optimizer sees them (fp32 masters of low-precision factors), in float64."""
    pair = optimizer.pairs[index]
    A, B = optimizer.value_of(pair.lora_B.weight, torch.float64), optimizer.value_of(pair.lora_A.weight, torch.float64).T
    return A, B, tangent_basis(A, B)


class TensorDataset(torch.utils.data.Dataset):
    """Examples as dicts of tensors, cut from one batch dict (for Trainer tests)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def stack_collate(examples: list[dict]) -> dict:
    """Collate equal-length examples by stacking each field."""
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


class StopAt(TrainerCallback):
    """Simulates a run killed right after the checkpoint of step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer_for(model, opt, data, tmp_path, callbacks=None, **args):
    """A vanilla Trainer on `data` (a dict of tensors) with the optimizer `opt`: CPU, no saving, no reports."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                    logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    settings.update(args)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=TensorDataset(data),
                   data_collator=stack_collate, optimizers=(opt, None), callbacks=callbacks)


def private_settings(n, **extra):
    """Optimizer arguments of a private run on n examples."""
    return {**dict(lr=0.03, max_grad_norm=1.0, delta=1e-5, dataset_size=n), **extra}
