"""Hugging Face ``Trainer`` with ring attention over ``world = dp x cp`` ranks: :class:`RingpackTrainer`.

It changes two things in ``Trainer`` and leaves the rest (optimizer, schedule, gradient accumulation,
logging, checkpoints, DDP/FSDP wrapping) to it:

- the training dataloader: :class:`~ringpack.integrations.data.ContextParallelBatchSampler` gives every
  context-parallel (CP) group one pack of at most ``max_tokens`` tokens per micro-batch, and
  :class:`~ringpack.integrations.data.RingpackCollator` packs it (the ``data_collator`` given, by default
  transformers' ``DataCollatorWithFlattening``) and keeps this rank's shard;
- ``compute_loss``: makes the batch's ``RingpackContext`` (from the collator's plan, so nothing is planned
  twice; every mask the model uses is planned here, outside any compiled region; the CP group is checked to
  hold one pack) and hands it to the model.

The loss needs nothing more: the collator's shards carry ``shift_labels``, so transformers' own
``num_items_in_batch`` (targets summed over the gradient-accumulation micro-batches and, with
``average_tokens_across_devices``, over all ranks) is the target count of the whole DP x CP batch. Each
rank's loss is then its tokens' share of that mean, multiplied by the world size, and DDP's (or FSDP's)
averaging of the gradients over the world gives exactly the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import DataCollatorWithFlattening, Trainer

from ringpack.distributed import group_layout
from ringpack.integrations.context import RingpackContext
from ringpack.integrations.data import SHARD_KEY, ContextParallelBatchSampler, RingpackCollator
from ringpack.integrations.hf_masks import mask_keys
from ringpack.integrations.transformers import prepare_model
from ringpack.plan import STRATEGIES


@dataclass(frozen=True)
class RingpackArguments:
    """How :class:`RingpackTrainer` packs and shards the training data."""

    max_tokens: int  # tokens per pack: every micro-batch of a CP group is one pack of at most this many tokens
    cp_size: int | None = None  # ranks per context-parallel group (consecutive ranks); None: the whole world
    strategy: str = "balanced"  # token layout over the CP group, a name in ringpack.STRATEGIES
    backend: str = "auto"  # local attention kernel, passed to ring_attention
    verify_batches: bool = True  # check every batch that the CP group holds one pack (one small all-gather)
    labels_shifted: bool | None = None  # how the collator's labels are read (ringpack.integrations.batch)
    length_column: str = "input_ids"  # the dataset column whose lengths multipack packs by

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; supported: {', '.join(STRATEGIES)}")


class RingpackTrainerMixin:
    """The ringpack parts of :class:`RingpackTrainer`, for any ``Trainer`` subclass (TRL's ``SFTTrainer``...)."""

    def __init__(self, *args, ringpack: RingpackArguments, **kwargs):
        given = kwargs.get("data_collator")
        super().__init__(*args, **kwargs)
        self.ringpack = ringpack
        world, rank = self.args.world_size, self.args.process_index
        cp = world if ringpack.cp_size is None else ringpack.cp_size
        if isinstance(cp, bool) or not isinstance(cp, int) or cp < 1 or world % cp:
            raise ValueError(f"cp_size must divide the world size {world}, got {ringpack.cp_size!r}")
        if world > 1 and not self.args.average_tokens_across_devices:
            raise ValueError("RingpackTrainer needs average_tokens_across_devices=True: each rank's loss is its share "
                             "of the mean over the targets of every rank's tokens")
        if self.args.n_gpu > 1:
            raise ValueError(f"RingpackTrainer runs one device per process (torchrun), not DataParallel over "
                             f"{self.args.n_gpu} GPUs")
        if self.args.label_smoothing_factor or self.compute_loss_func is not None:
            raise ValueError("RingpackTrainer hands the loss already-shifted targets (labels == shift_labels, this "
                             "rank's shard); label smoothing and compute_loss_func would shift them again. Use "
                             "label_smoothing_factor=0 and no compute_loss_func")
        if self.args.eval_strategy != "no":
            raise ValueError("RingpackTrainer trains only: evaluation batches are not sharded; set eval_strategy='no' "
                             "and evaluate with a plain loop (ringpack.integrations.transformers.model_inputs)")
        self.cp_size, self.cp_rank, self.dp_rank = cp, rank % cp, rank // cp
        self.dp_size = world // cp
        self.cp_group = _cp_group(world, rank, cp)
        prepare_model(self.model)
        self.data_collator = RingpackCollator(self._packing_collator(given), cp_rank=self.cp_rank, cp_size=cp,
                                              strategy=ringpack.strategy, labels_shifted=ringpack.labels_shifted)

    def _packing_collator(self, given):
        """The collator that makes the global packed row (the one passed in, else DataCollatorWithFlattening)."""
        return given if given is not None else DataCollatorWithFlattening()

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self.data_collator
        try:
            import datasets
        except ImportError:
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = ContextParallelBatchSampler(_lengths(dataset, self.ringpack.length_column),
                                              self.ringpack.max_tokens, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                              shuffle=True, seed=self.args.seed,
                                              drop_last=self.args.dataloader_drop_last)
        workers = self.args.dataloader_num_workers
        return _PackLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                          pin_memory=self.args.dataloader_pin_memory,
                          persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        shard = inputs.pop(SHARD_KEY, None)
        if shard is None or shard.rank != self.cp_rank or shard.plan.world_size != self.cp_size:
            raise ValueError(f"the batch was not sharded for CP rank {self.cp_rank} of {self.cp_size}: batches must "
                             "come from RingpackTrainer's own train dataloader (RingpackCollator)")
        plan = shard.plan
        context = RingpackContext(plan.cu_seqlens, group=self.cp_group, strategy=plan.strategy,
                                  backend=self.ringpack.backend, causal=plan.causal, window_size=plan.window_size,
                                  verify=self.ringpack.verify_batches, content_digest=shard.digest, layout=plan)
        context.prepare(mask_keys(self.model.config))
        inputs["ringpack_context"] = context
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class RingpackTrainer(RingpackTrainerMixin, Trainer):
    """``transformers.Trainer`` whose every micro-batch is one pack, run with ring attention over the CP group.

    Build it as a ``Trainer``, plus ``ringpack=RingpackArguments(max_tokens=..., cp_size=...)``; the model must
    run ``attn_implementation="ringpack"`` (importing ringpack.integrations.transformers registers it). Under
    ``torchrun`` with ``world = dp x cp`` processes, consecutive ranks form the CP groups.
    """


class _PackLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` (called by Trainer every epoch) reshuffles its batch sampler's packs."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)


def _cp_group(world: int, rank: int, cp: int) -> dist.ProcessGroup | None:
    if world == 1:
        return None
    if cp == world:
        return dist.group.WORLD
    own = None
    for ranks in group_layout(world, cp)[0]:  # new_group is collective: every rank creates every group
        group = dist.new_group(ranks)
        if rank in ranks:
            own = group
    return own


def _lengths(dataset, column: str) -> list[int]:
    if hasattr(dataset, "column_names") and column in dataset.column_names:
        return [len(x) for x in dataset[column]]
    return [len(dataset[i][column]) for i in range(len(dataset))]

