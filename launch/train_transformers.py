"""A few training steps of a small Llama over packed documents with ring attention (transformers).

Every rank of the context-parallel group loads the same packs, keeps its share of each pack's tokens
(``model_inputs``) and runs the model with ``attn_implementation="ringpack"``; the ranks' gradients add up
to the gradient of the whole pack. Runs on CPUs (gloo) or GPUs (NCCL)::

    torchrun --standalone --nproc-per-node 2 launch/train_transformers.py --steps 3
    torchrun --standalone --nproc-per-node 2 launch/train_transformers.py --deepspeed   # deepspeed.initialize
    mpirun -np 2 python launch/train_transformers.py                     # mpi4py, as `ringpack check`

With ``--deepspeed`` the model is trained through ``deepspeed.initialize`` with a sequence-parallel group
of all ranks, which is the ring's group; DeepSpeed then sums the ranks' gradient shares itself.

Random tokens and a randomly initialised model: this shows the wiring, not a learning curve.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig

from ringpack import MultipackBatchSampler, PackingCollator
from ringpack.distributed import init_distributed
from ringpack.integrations import RingpackContext
from ringpack.integrations.transformers import model_inputs, prepare_model, register


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per pack (one pack per step)")
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--deepspeed", action="store_true", help="train through deepspeed.initialize")
    args = parser.parse_args()

    groups = init_distributed()
    register()
    torch.manual_seed(0)  # the same model and data on every rank
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)
    model = prepare_model(AutoModelForCausalLM.from_config(config, attn_implementation="ringpack").to(groups.device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cp_group = groups.cp_group
    if args.deepspeed:
        import deepspeed

        from ringpack.integrations.deepspeed import sequence_parallel_mpu

        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group above
        ds_config = {"train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": groups.world_size,
                  "zero_optimization": {"stage": 0}}
        model, optimizer, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                    mpu=sequence_parallel_mpu(groups.world_size))
        cp_group = model.get_sequence_parallel_group()

    lengths = torch.randint(16, 400, (64,)).tolist()
    samples = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in lengths]
    sampler = MultipackBatchSampler(lengths, args.max_tokens)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=sampler, collate_fn=PackingCollator())
    if groups.rank == 0:
        print(f"{len(sampler)} packs of <= {args.max_tokens} tokens, packing efficiency {sampler.efficiency:.3f}; "
              f"{groups.cp_size} context-parallel ranks on {groups.device.type}")

    for step, batch in zip(range(args.steps), loader):
        context = RingpackContext.from_batch(batch, group=cp_group, strategy=args.strategy)  # checks the group
        inputs = {k: v.to(groups.device) if isinstance(v, torch.Tensor) else v
                  for k, v in model_inputs(batch, context).items()}
        loss = model(**inputs).loss  # this rank's share of the pack's mean loss
        if args.deepspeed:
            model.backward(loss)  # sums the shares over the sequence-parallel ranks
            model.step()
        else:
            loss.backward()
            for p in model.parameters():  # shares add up to the gradient of the whole pack
                dist.all_reduce(p.grad, group=cp_group)
            optimizer.step()
            optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=cp_group)
        if groups.rank == 0:
            print(f"step {step}: {int(batch['cu_seqlens'].numel()) - 1} documents, "
                  f"{int(batch['cu_seqlens'][-1])} tokens, loss {total.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
