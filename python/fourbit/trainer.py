# SPDX-License-Identifier: Apache-2.0
"""transformers ``Trainer`` support: checkpoints that hold only the adapter, and resuming from them.

A plain ``Trainer`` saves a fourbit model's whole state dict in every checkpoint and, on resume, looks for those
weights. ``AdapterTrainer`` saves the LoRA adapter alone (PEFT's files, so a checkpoint folder also loads with
``PeftModel.from_pretrained`` or ``fourbit.load_adapter``) next to the optimizer, scheduler and RNG states the Trainer
writes anyway, and resumes by loading the adapter's tensors back into the model's adapter.
"""

from __future__ import annotations

import os

import torch
import transformers

from .model import ADAPTER_WEIGHTS, active_adapters, load_adapter_weights, lora_layers, save_adapter

__all__ = ["AdapterTrainer"]


class AdapterTrainer(transformers.Trainer):
    """``transformers.Trainer`` for a model with fourbit LoRA adapters: checkpoints hold the active adapter only."""

    def _adapter_name(self) -> str:
        model = self.accelerator.unwrap_model(self.model)
        if not lora_layers(model):
            raise ValueError("AdapterTrainer needs a model with LoRA adapters (fourbit.add_lora)")
        names = active_adapters(model)
        if len(names) != 1:
            raise ValueError(f"AdapterTrainer saves one active adapter; the model has {names} active")
        return names[0]

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir, self._adapter_name())
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if not os.path.isfile(os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS)):
            raise ValueError(f"{resume_from_checkpoint!r} has no {ADAPTER_WEIGHTS}: not an AdapterTrainer checkpoint")
        load_adapter_weights(model, resume_from_checkpoint, self._adapter_name())

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
