"""TRL's `SFTTrainer` underneath `ftrecipe train`, with what ftrecipe adds to it.

TRL does the chat rendering, the completion-only labels (conversational prompt–completion records:
`completion_only_loss`), the collator (padded or padding-free), the LoRA wrapping (`peft_config`, seeded
before the adapter is initialised) and, by default, a fused LM head that never builds the full logits.
`FtrecipeSFTTrainer` adds:

- drop instead of truncate: TRL cuts an example longer than `max_length`; a cut completion would teach
  the model to stop mid-command, so `max_length` is left unset and every example longer than
  `maxSeqLength` is dropped after TRL tokenized it, and counted (`counts`);
- the loss lever (`hyperparameters.lossLogits`): `labels` computes the LM head only where the labels are
  (`loss.label_loss`: Liger's fused linear cross-entropy on CUDA when `liger-kernel` is installed, else
  the head on the labelled rows alone; TRL's fused head for models that scale or soft-cap their logits),
  `all` builds the full logits as a plain transformers `Trainer` does. The label-only loss runs inside
  the model's forward (a `label_positions_loss=True` keyword, as TRL adds `fused_lm_head`), so under
  torchrun it goes through DistributedDataParallel's forward and the gradients are synchronised;
- the adapter weights in float32 wherever bf16 is not the compute dtype (TRL casts them to bf16 under
  quantization, which a GPU without native bf16 emulates and a float32 CPU run would round);
- `_get_train_sampler`: the override point for the order of the training examples (see there).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from trl.trainer.sft_trainer import SFTTrainer

from ftrecipe.training.data import read_records
from ftrecipe.training.sampling import epoch_seeded_sampler

if TYPE_CHECKING:
    from datasets import Dataset

LossLogits = Literal["labels", "all"]


@dataclass(frozen=True)
class SplitCounts:
    """Records read from a split, and how many of them were dropped as longer than maxSeqLength."""

    total: int = 0
    dropped_too_long: int = 0

    @property
    def kept(self) -> int:
        return self.total - self.dropped_too_long


def prompt_completion(messages: Sequence[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """A chat as TRL's conversational prompt–completion record: every message but the answer, and the answer.

    Both of ftrecipe's record formats become this (`data.to_messages`), so the instruction format is
    trained as the one-turn chat the chat-completions endpoint serves.
    """
    return {"prompt": list(messages[:-1]), "completion": [dict(messages[-1])]}


def read_dataset(path: Path) -> Dataset:
    """A split file as a `datasets.Dataset` of prompt–completion chats (a bad line: `DataError`)."""
    from datasets import Dataset

    return Dataset.from_list([prompt_completion(messages) for messages in read_records(path)])


def too_long(lengths: Iterable[int], max_seq_length: int) -> list[int]:
    """Indices of the examples longer than `max_seq_length` tokens."""
    return [index for index, length in enumerate(lengths) if length > max_seq_length]


class FtrecipeSFTTrainer(SFTTrainer):
    """`SFTTrainer` that drops too-long examples, chooses where the logits are computed, keeps adapters fp32."""

    def __init__(
        self,
        *args: Any,
        max_seq_length: int,
        loss_logits: LossLogits = "labels",
        adapters_in_float32: bool = True,
        **kwargs: Any,
    ) -> None:
        # Set before SFTTrainer.__init__, which prepares (tokenizes) the datasets through _prepare_dataset.
        self.max_seq_length = max_seq_length
        self.loss_logits: LossLogits = loss_logits
        self.counts: dict[str, SplitCounts] = {}
        super().__init__(*args, **kwargs)
        if adapters_in_float32:
            adapters_to_float32(self.model)
        from ftrecipe.training.loss import plain_lm_head_problem

        wrapped: Any = self.model
        inner = wrapped.get_base_model() if hasattr(wrapped, "get_base_model") else wrapped
        # Logits scaled or soft-capped after the head: TRL's fused head applies those, the plain one not.
        self.label_head_problem = plain_lm_head_problem(inner.config)
        add_label_positions_head(inner)

    def create_accelerator_and_postprocess(self) -> None:
        """transformers' accelerator; on CPU ranks with `fsdp` asked for, FSDP turned on (`fsdp.enable_fsdp_on_cpu`)."""
        super().create_accelerator_and_postprocess()
        from ftrecipe.training.fsdp import enable_fsdp_on_cpu

        if enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def _prepare_dataset(
        self,
        dataset: Any,
        processing_class: Any,
        args: Any,
        packing: bool,
        formatting_func: Any,
        dataset_name: str,
    ) -> Any:
        """TRL's tokenization and labels (`args.max_length` is None: nothing cut), then the too-long dropped."""
        prepared = super()._prepare_dataset(
            dataset, processing_class, args, packing, formatting_func, dataset_name
        )
        dropped = set(too_long((len(ids) for ids in prepared["input_ids"]), self.max_seq_length))
        self.counts[dataset_name] = SplitCounts(total=len(prepared), dropped_too_long=len(dropped))
        if dropped:
            prepared = prepared.select([i for i in range(len(prepared)) if i not in dropped])
        return prepared

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.loss_logits == "all":
            # The plain transformers loss: the model's forward builds every logit (the baseline's way).
            from transformers import Trainer

            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if self.label_head_problem is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[no-untyped-call]
        outputs = model(**inputs, label_positions_loss=True, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: the divisor counts every rank's tokens, and DDP averages gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """The order of the training examples: transformers' (`train_sampling_strategy`, `data_seed`),
        its randomness drawn from `data_seed + epoch` (`sampling.epoch_seeded_sampler`), so a resumed run
        sees each epoch in the order an uninterrupted one saw it.
        """
        sampler = epoch_seeded_sampler(self, train_dataset)
        return super()._get_train_sampler(train_dataset) if sampler is None else sampler


def add_label_positions_head(model: Any) -> None:
    """`model(..., labels=..., label_positions_loss=True)` returns the label-only loss, no logits.

    Without the keyword the forward is the model's own (generation, evaluation with logits, TRL's
    `fused_lm_head`). Patched on the transformers model, under peft and DDP, which pass keywords through.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from ftrecipe.training.loss import causal_lm_label_loss

    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(
        self: Any,
        *args: Any,
        label_positions_loss: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not label_positions_loss:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, **kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        loss = causal_lm_label_loss(self, kwargs, num_items_in_batch=num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)


def adapters_to_float32(model: Any) -> int:
    """Trainable (adapter) weights in float32; returns how many were cast.

    TRL casts them to bf16 when the base is quantized (QLoRA's recipe on bf16 GPUs). On a GPU without
    native bf16 the compute runs in fp16 with a gradient scaler, which refuses anything but float32
    master weights; on the CPU everything is float32. Callers skip this when bf16 is the compute dtype.
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast
