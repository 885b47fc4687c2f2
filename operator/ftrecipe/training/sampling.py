"""Data order from the seed and the epoch alone, so a resumed run sees the batches an uninterrupted one saw.

transformers' length-grouped sampler draws its permutation from torch's global generator when it is
iterated. In an uninterrupted run that generator has by then been advanced by epoch 1's dropout; a run
resumed in epoch 2 draws from another state and skips (and then trains on) other examples. Here epoch
`e` is ordered with a generator seeded `seed + e`, the same on every rank and after any resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

ORDERED_STRATEGIES = ("group_by_length", "random")  # train_sampling_strategy values ordered here


def epoch_order(lengths: Sequence[int], group_size: int, seed: int, epoch: int, by_length: bool) -> list[int]:
    """The example indices of `epoch`: a permutation seeded `seed + epoch`.

    `by_length`: then grouped as transformers groups them (mega-batches sorted by length, the longest
    example first), `group_size` examples per optimizer step and device.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed + epoch)
    if not by_length:
        return [int(i) for i in torch.randperm(len(lengths), generator=generator).tolist()]
    grouped = get_length_grouped_indices(list(lengths), group_size, generator=generator)  # type: ignore[no-untyped-call]
    return [int(i) for i in grouped]


class EpochSeededSampler:
    """A torch Sampler whose order depends only on (seed, epoch); `epoch_of` says which epoch is running.

    The epoch is read when an epoch's iteration starts, from the Trainer's state, rather than pushed with
    `set_epoch`: accelerate does not forward `set_epoch` through the wrappers of a resumed data-parallel
    loader (skip-batches around the per-rank shard).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        group_size: int,
        seed: int,
        epoch_of: Callable[[], int],
        by_length: bool = True,
    ) -> None:
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.epoch_of = epoch_of
        self.by_length = by_length

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.lengths, self.group_size, self.seed, self.epoch_of(), self.by_length))


def _lengths(dataset: Any, column: str) -> list[int]:
    """Token count of each example (its `column`, input_ids by default)."""
    names = getattr(dataset, "column_names", None)
    if names is not None and column in names:  # a datasets.Dataset: read the column, not every row
        return [len(item) for item in dataset[column]]
    return [len(item[column]) for item in dataset]


def epoch_seeded_sampler(trainer: Any, train_dataset: Any = None) -> EpochSeededSampler | None:
    """The sampler for a transformers `Trainer`'s (or TRL `SFTTrainer`'s) `_get_train_sampler`, or None.

    Length grouping and plain shuffling keep their behaviour; only the randomness comes from
    `data_seed + epoch`. None for other sampling strategies (left to the Trainer) and datasets without a
    length.
    """
    args = trainer.args
    dataset = trainer.train_dataset if train_dataset is None else train_dataset
    strategy = getattr(args, "train_sampling_strategy", None)
    if strategy is None:  # transformers 4: a flag
        strategy = "group_by_length" if getattr(args, "group_by_length", False) else "random"
    if strategy not in ORDERED_STRATEGIES or dataset is None or not hasattr(dataset, "__len__"):
        return None
    by_length = strategy == "group_by_length"
    return EpochSeededSampler(
        _lengths(dataset, "input_ids") if by_length else [0] * len(dataset),
        args.train_batch_size * args.gradient_accumulation_steps,
        args.data_seed if args.data_seed is not None else args.seed,
        # the Trainer's epoch: whole at each epoch's start; on a resume, the epoch it continues
        lambda: math.floor(trainer.state.epoch or 0),
        by_length=by_length,
    )


def with_epoch_seeded_order(trainer_class: type[Any]) -> type[Any]:
    """`trainer_class` whose `_get_train_sampler` is `epoch_seeded_sampler` where that applies."""

    class EpochSeededTrainer(trainer_class):  # type: ignore[misc]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            sampler = epoch_seeded_sampler(self, train_dataset)
            return super()._get_train_sampler(train_dataset) if sampler is None else sampler

    EpochSeededTrainer.__name__ = EpochSeededTrainer.__qualname__ = f"EpochSeeded{trainer_class.__name__}"
    return EpochSeededTrainer
