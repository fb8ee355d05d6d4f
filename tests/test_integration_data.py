"""The data side of the framework integrations, in one process: packed batches as ringpack and Hugging Face
collators make them (``integrations.batch``), the DP x CP batch sampler and the sharding collator."""

from __future__ import annotations

import pytest
import torch

import ringpack
from ringpack.integrations.batch import packed_batch
from ringpack.integrations.data import SHARD_KEY, ContextParallelBatchSampler, RingpackCollator
from ringpack.packing import PackingCollator

LENGTHS = (23, 1, 41, 9, 30)


def _samples():
    gen = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(0, 100, (n,), generator=gen).tolist()} for n in LENGTHS]
    for s in samples:
        s["labels"] = list(s["input_ids"])
    samples[2]["labels"][:10] = [-100] * 10  # a masked prompt
    return samples


@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_flattened_and_ringpack_batches_give_the_same_targets(flash_kwargs):
    """transformers' flattened labels (not shifted, -100 at document starts) and ringpack's (shifted per
    document) must become the same per-document next-token targets. Catches labels read as already shifted
    (every token predicting itself) or shifted across a document boundary."""
    transformers = pytest.importorskip("transformers")
    ours = packed_batch(PackingCollator()(_samples()))
    theirs = packed_batch(transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(_samples()))
    assert torch.equal(ours["shift_labels"], theirs["shift_labels"])
    assert torch.equal(ours["cu_seqlens"], theirs["cu_seqlens"])
    assert torch.equal(ours["position_ids"], theirs["position_ids"])
    assert set(theirs) == {"cu_seqlens", "input_ids", "position_ids", "shift_labels"}


def _flat(labels=None, **extra):
    ids = torch.arange(10)[None]
    batch = {"input_ids": ids, "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])}
    if labels is not None:
        batch["labels"] = torch.tensor([labels])
    return {**batch, **extra}


@pytest.mark.parametrize("batch,match", [
    ({**_flat(list(range(10))), "cu_seqlens": torch.tensor([0, 4, 7, 10])}, "last token of a document has a target"),
    (_flat(list(range(10))), "cannot tell whether batch\\['labels'\\] is shifted"),
    (_flat(cu_seq_lens_q=torch.tensor([0, 4, 7, 10]), cu_seq_lens_k=torch.tensor([0, 5, 10])), "boundaries disagree"),
    (_flat(max_length_q=3), "longest document has 4 tokens"),
    ({"input_ids": torch.arange(4)[None], "position_ids": torch.tensor([[1, 2, 3, 4]])}, "must start at 0"),
    ({"input_ids": torch.arange(4)[None], "cu_seq_lens_q": torch.tensor([0, 4]),
      "position_ids": torch.tensor([[2, 3, 4, 5]])}, "restart at 0 at every document"),
    (_flat(pixel_values=torch.zeros(1, 3, 4, 4)), "one row"),
])
def test_unreadable_batches_are_refused(batch, match):
    """Labels that cannot be told shifted from unshifted, or contradict the claim; boundaries that disagree;
    positions not counted from each document's start; entries that are not one packed row: each a ValueError,
    never a guess."""
    with pytest.raises(ValueError, match=match):
        packed_batch(batch)


def test_labels_shifted_can_be_stated():
    """An explicit ``labels_shifted`` settles what the defaults cannot tell: False shifts inside each document."""
    out = packed_batch(_flat(list(range(10))), labels_shifted=False)
    assert out["shift_labels"].tolist() == [[1, 2, 3, -100, 5, 6, -100, 8, 9, -100]]


def test_sampler_gives_dp_ranks_disjoint_packs_and_cp_ranks_the_same():
    """Every DP rank takes as many steps; together they take every pack once per epoch (wrapping the last round
    when the count does not divide); ranks of one CP group (same DP rank) get the same packs; the order changes
    with the epoch. Catches DP ranks training on the same data or CP ranks on different packs."""
    lengths = torch.randint(5, 60, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    ranks = [ContextParallelBatchSampler(lengths, 128, dp_rank=d, dp_size=3, seed=1) for d in range(3)]
    packs = {tuple(p) for p in ranks[0].packs}
    epoch0 = [list(map(tuple, r)) for r in ranks]
    assert len({len(e) for e in epoch0}) == 1 and len(epoch0[0]) == len(ranks[0]) == -(-len(packs) // 3)
    assert {p for e in epoch0 for p in e} == packs
    same_group = ContextParallelBatchSampler(lengths, 128, dp_rank=1, dp_size=3, seed=1)
    assert list(map(tuple, same_group)) == epoch0[1]
    ranks[0].set_epoch(1)
    assert list(map(tuple, ranks[0])) != epoch0[0]
    dropped = ContextParallelBatchSampler(lengths, 128, dp_rank=0, dp_size=3, seed=1, drop_last=True)
    assert len(list(dropped)) == len(packs) // 3


def test_collator_shards_reassemble_into_the_global_pack():
    """The CP ranks' shards of one pack, put back together by the plan, are the global packed row (targets
    included), and each carries the plan and rank it was cut for."""
    pack = packed_batch(PackingCollator()(_samples()))
    parts = [RingpackCollator(PackingCollator(), cp_rank=r, cp_size=3)(_samples()) for r in range(3)]
    plan = parts[0][SHARD_KEY].plan
    assert [p[SHARD_KEY].rank for p in parts] == [0, 1, 2] and plan.cu_seqlens == tuple(pack["cu_seqlens"].tolist())
    for key in ("input_ids", "position_ids", "shift_labels"):
        assert torch.equal(ringpack.unshard([p[key][0] for p in parts], plan), pack[key][0]), key
    assert all(torch.equal(p["labels"], p["shift_labels"]) for p in parts)
