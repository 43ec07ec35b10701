"""The Hugging Face Trainer integration's refusals: setups and changes that would break the privacy
guarantee or the accounting fail loudly (prism.hf.make_private and the optimizer's checks)."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

import prism
import prism.hf
from helpers import (TensorDataset, lora_layers, make_batch, private_settings, stack_collate, tiny_model,
                     trainer_for)
from prism import NonPoissonSampling, PRISM

pytestmark = pytest.mark.filterwarnings("ignore:TrainingArguments.max_grad_norm")


def test_make_private_leaves_the_callers_arguments_as_given(tmp_path):
    """Arguments reused for a second run must not carry the first run's max_steps or switched-off clip."""
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=3))
    trainer = trainer_for(model, opt, make_batch("bert", 64, seed=4), tmp_path)
    given = trainer.args
    with pytest.warns(UserWarning, match="max_grad_norm"):
        prism.hf.make_private(trainer, sampling_seed=1)
    assert (given.max_steps, given.max_grad_norm, given.ignore_data_skip) == (-1, 1.0, False)
    assert (trainer.args.max_steps, trainer.args.max_grad_norm, trainer.args.ignore_data_skip) == (3, 0.0, True)
    trainer.train()
    assert opt.steps_taken == 3


@pytest.mark.parametrize("change, message", [
    (lambda trainer: setattr(trainer.args, "gradient_accumulation_steps", 4), "gradient_accumulation_steps is 4"),
    (lambda trainer: setattr(trainer, "train_dataset", TensorDataset(make_batch("bert", 96, seed=5))),
     "train_dataset has 96 examples"),
])
def test_settings_changed_after_make_private_are_refused(tmp_path, change, message):
    """The Poisson sampler is sized at make_private: a later accumulation change would put two draws in
    one private step (an example could count twice), a later dataset would be sampled with the old N."""
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=3))
    trainer = trainer_for(model, opt, make_batch("bert", 64, seed=4), tmp_path)
    prism.hf.make_private(trainer, sampling_seed=1)
    change(trainer)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert opt.steps_taken == 0


def test_a_stale_initial_adapter_is_refused(tmp_path):
    for seed in (0, 1):
        model = tiny_model("bert", dtype=torch.float32, seed=seed)
        opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=4))
        trainer = trainer_for(model, opt, make_batch("bert", 64, seed=6), tmp_path)
        if seed == 1:
            with pytest.raises(ValueError, match="different initialisation"):
                prism.hf.make_private(trainer)
        else:
            prism.hf.make_private(trainer)


def test_a_trainer_without_poisson_sampling_is_refused(tmp_path):
    """Trainer's own shuffled fixed-size batches are not Poisson: the optimizer refuses to go on."""
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(400, noise_multiplier=1.0, expected_batch_size=8))
    trainer = trainer_for(model, opt, make_batch("bert", 400, seed=2), tmp_path, gradient_accumulation_steps=1,
                          max_steps=45, logging_steps=100)
    with pytest.raises(NonPoissonSampling):
        trainer.train()


def test_a_dataset_of_another_size_is_refused_by_the_loop_and_the_trainer(tmp_path):
    """One check (the optimizer's plan) refuses to sample a dataset the rate was not set for."""
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(150, noise_multiplier=1.0, expected_batch_size=10, steps=20))
    data = make_batch("bert", 100, seed=2)
    with pytest.raises(ValueError, match="has 100 examples but the optimizer was built for 150"):
        opt.poisson_data_loader(torch.utils.data.DataLoader(TensorDataset(data)))
    with pytest.raises(ValueError, match=r"train_dataset has 100 examples but the optimizer was built for 150 .*"
                                         r"dataset_size=len\(train_dataset\)"):
        prism.hf.make_private(trainer_for(model, opt, data, tmp_path))
    opt.plan.check_dataset_size(150)
    with pytest.raises(ValueError, match="no sampling rate"):
        PRISM(tiny_model("bert"), lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0,
              expected_batch_size=4).plan.check_dataset_size(150)


@pytest.mark.parametrize("change, error, match", [
    (dict(optimizer=lambda model: torch.optim.AdamW(model.parameters())), TypeError, "prism optimizer"),
    (dict(args=dict(max_steps=50)), ValueError, "calibrated for"),
    (dict(opt_args=dict(dataset_size=None, sample_rate=None)), ValueError, "cannot account"),
    (dict(args=dict(include_num_input_tokens_seen=True)), ValueError, "token count"),
    (dict(args=dict(neftune_noise_alpha=5.0)), ValueError, "neftune"),
    (dict(args=dict(auto_find_batch_size=True)), ValueError, "auto_find_batch_size"),
    (dict(args=dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})),
     ValueError, "use_reentrant"),
    (dict(args=dict(fp16=True)), ValueError, "fp16"),
])
def test_make_private_refuses_bad_setups(change, error, match, tmp_path):
    model = tiny_model("bert", dtype=torch.float32)
    opt_args = {**private_settings(100, noise_multiplier=1.0, expected_batch_size=10, steps=20),
                **change.get("opt_args", {})}
    opt = change.get("optimizer", lambda model: PRISM(model, **opt_args))(model)
    trainer = trainer_for(model, opt, make_batch("bert", 100, seed=2), tmp_path, **change.get("args", {}))
    with pytest.raises(error, match=match):
        prism.hf.make_private(trainer)


class _WeightedLossTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return 2.0 * super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_a_custom_compute_loss_needs_its_per_example_version(tmp_path):
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(100, noise_multiplier=1.0, expected_batch_size=10, steps=20))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True)
    trainer = _WeightedLossTrainer(model=model, args=args, train_dataset=TensorDataset(make_batch("bert", 100, seed=2)),
                                   data_collator=stack_collate, optimizers=(opt, None))
    with pytest.raises(ValueError, match="_WeightedLossTrainer has its own compute_loss.*per_example_loss="):
        prism.hf.make_private(trainer)
    weighted = prism.hf.default_per_example_loss(model)
    prism.hf.make_private(trainer, per_example_loss=lambda outputs, labels: 2.0 * weighted(outputs, labels))


def test_an_unknown_task_needs_a_loss():
    model = lora_layers(tiny_model("bert"))[0][2]  # a bare LoRA layer: no task to infer
    with pytest.raises(ValueError, match="per_example_loss"):
        prism.hf.default_per_example_loss(model)


def test_a_collator_that_packs_examples_into_one_row_is_refused(tmp_path):
    def packing(examples):  # several examples in one row, as padding-free collators do
        return {"input_ids": torch.cat([e["input_ids"] for e in examples])[None], "labels": examples[0]["labels"][None]}

    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=3))
    trainer = trainer_for(model, opt, make_batch("bert", 64, seed=4), tmp_path)
    trainer.data_collator = packing
    prism.hf.make_private(trainer, sampling_seed=1)
    with pytest.raises(ValueError, match="one row per example"):
        trainer.train()


def test_replaced_parameters_are_refused_then_restored():
    """peft's load_adapter swaps bf16 adapter Parameters for new fp32 ones when a Trainer resumes."""
    model = tiny_model("bert", dtype=torch.bfloat16)
    opt = PRISM(model, lr=0.1, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
    lora_A = lora_layers(model)[0][0]
    old = lora_A.weight
    loaded = old.detach().float() + 1
    lora_A.weight = torch.nn.Parameter(loaded)
    with pytest.raises(RuntimeError, match="restore_parameters"):
        opt.step()
    assert opt.restore_parameters() == 1
    assert lora_A.weight is old and torch.equal(old, loaded.to(torch.bfloat16))
    opt.step()


@pytest.mark.parametrize("generator", [None, "secure"])
def test_pushing_checkpoints_to_the_hub_is_refused_even_with_secure_noise(generator, tmp_path):
    """Checkpoints hold the un-noised training loss and the realised batch sizes, whatever the noise."""
    model = tiny_model("bert", dtype=torch.float32)
    opt = PRISM(model, **private_settings(64, noise_multiplier=1.0, expected_batch_size=16, steps=3),
                generator=generator)
    trainer = trainer_for(model, opt, make_batch("bert", 64, seed=4), tmp_path)
    trainer.args.push_to_hub, trainer.args.hub_strategy = True, "checkpoint"  # set after the Trainer: offline
    with pytest.raises(ValueError, match="un-noised training loss"):
        prism.hf.make_private(trainer)
