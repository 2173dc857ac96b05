# SPDX-License-Identifier: Apache-2.0
"""transformers' Trainer on a 4-bit LoRA model: adapter-only checkpoints and an exact resume."""

import os

import peft
import torch
import transformers

import fourbit
from fourbit.trainer import AdapterTrainer

transformers.logging.set_verbosity_error()


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = fourbit.quantize_model(transformers.LlamaForCausalLM(config), progress=False)
    torch.manual_seed(1)
    return fourbit.add_lora(model, fourbit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def _data():
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 256, (2, 12), generator=g).repeat(8, 1)  # two sequences to memorise
    return [{"input_ids": r, "labels": r} for r in rows]


def _args(out, max_steps):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to=[], use_cpu=True, seed=3, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip


def _adapter(model):
    return {k: v.clone() for k, v in fourbit.adapter_state_dict(model).items()}


def test_adapter_only_checkpoints_and_exact_resume(tmp_path):
    model = _model()
    trainer = AdapterTrainer(model=model, args=_args(tmp_path / "run", 4), train_dataset=_data())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1, losses
    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not any(f.startswith("model") for f in files)  # no base weights in the checkpoint
    final = _adapter(model)
    # A checkpoint is a PEFT adapter.
    peft.PeftConfig.from_pretrained(checkpoint)

    # Resume from step 2 on a fresh model: the same final adapter as the uninterrupted run.
    resumed_model = _model()
    resumed = AdapterTrainer(model=resumed_model, args=_args(tmp_path / "run", 4), train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    again = _adapter(resumed_model)
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=1e-5, atol=1e-6)
