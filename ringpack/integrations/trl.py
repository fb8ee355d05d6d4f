"""TRL: ``SFTTrainer`` with ring attention over ``world = dp x cp`` ranks: :class:`RingpackSFTTrainer`.

It is ``SFTTrainer`` with the ringpack parts of ``RingpackTrainer`` (the pack-per-CP-group dataloader and
the per-batch context, :class:`~ringpack.integrations.trainer.RingpackTrainerMixin`). The global packed row
is made by SFTTrainer's own padding-free collator, so ``padding_free=True`` (or packing with the ``bfd``
strategy) is required. SFTTrainer's loss (its fused LM head over ``shift_labels``, divided by transformers'
``num_items_in_batch``) is then each rank's share of the DP x CP batch's mean, as in ``RingpackTrainer``.
"""

from __future__ import annotations

from trl import SFTTrainer

from ringpack.integrations.trainer import RingpackTrainerMixin


class RingpackSFTTrainer(RingpackTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose every micro-batch is one pack, run with ring attention over the CP group.

    Build it as an ``SFTTrainer`` with ``SFTConfig(padding_free=True, ...)``, plus
    ``ringpack=RingpackArguments(max_tokens=..., cp_size=...)``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled and self.cp_size > 1:
            raise ValueError("SFTTrainer adds the MoE router auxiliary loss of each rank's own tokens, which is not "
                             "the pack's over a context-parallel group; set the model's output_router_logits=False "
                             "(or use RingpackTrainer, which makes that loss exact)")

    def _packing_collator(self, given):
        if not self.padding_free:
            raise ValueError("RingpackSFTTrainer needs SFTConfig(padding_free=True) (or packing=True with "
                             "packing_strategy='bfd'): its collator must return one packed row per batch")
        return self.data_collator
