"""A few steps of transformers' ``Trainer`` (or TRL's ``SFTTrainer``) on packed documents with ring attention.

World = dp x cp processes: consecutive ranks form the context-parallel groups, each of which trains on one
pack of at most ``--max-tokens`` tokens per micro-batch; the data-parallel groups train on different packs.
``Trainer`` prints its progress bar and log lines on rank 0. Runs on CPUs (gloo) or GPUs (NCCL)::

    torchrun --standalone --nproc-per-node 2 launch/train_hf_trainer.py --steps 3                  # cp 2
    torchrun --standalone --nproc-per-node 4 launch/train_hf_trainer.py --steps 3 --cp-size 2      # dp 2 x cp 2
    torchrun --standalone --nproc-per-node 2 launch/train_hf_trainer.py --trl                      # SFTTrainer

Random tokens and a randomly initialised model: this shows the wiring, not a learning curve.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, MistralConfig, TrainingArguments

from ringpack.integrations.trainer import RingpackArguments, RingpackTrainer
from ringpack.integrations.transformers import from_config

MODELS = {"llama": LlamaConfig, "mistral": MistralConfig}  # mistral: sliding window of 256 tokens


def _dataset(vocab: int, samples: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 400, (samples,), generator=gen).tolist()
    return [{"input_ids": torch.randint(0, vocab, (n,), generator=gen).tolist()} for n in lengths]


def _tokenizer(vocab: int):
    """A word-level tokenizer over the model's vocabulary (SFTTrainer wants one for its pad token)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="t0")), pad_token="t0",
                                   eos_token="t1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps")
    parser.add_argument("--max-tokens", type=int, default=1024, help="tokens per pack (one pack per micro-batch)")
    parser.add_argument("--cp-size", type=int, default=None, help="ranks per context-parallel group (default: all)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama")
    parser.add_argument("--strategy", default="balanced")
    parser.add_argument("--trl", action="store_true", help="train with TRL's SFTTrainer (padding_free=True)")
    args = parser.parse_args()

    config = MODELS[args.model](hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096,
                                **({"sliding_window": 256} if args.model == "mistral" else {}))
    torch.manual_seed(0)  # the same model on every rank
    model = from_config(config, dtype=torch.float32)
    options = dict(output_dir=tempfile.mkdtemp(prefix="ringpack-trainer-"), max_steps=args.steps,
                   gradient_accumulation_steps=args.grad_accum, learning_rate=1e-3, logging_steps=1, report_to=[],
                   save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=0, dataloader_pin_memory=False)
    ringpack = RingpackArguments(max_tokens=args.max_tokens, cp_size=args.cp_size, strategy=args.strategy)
    data = _dataset(config.vocab_size, 64, seed=0)
    if args.trl:
        import datasets
        from trl import SFTConfig

        from ringpack.integrations.trl import RingpackSFTTrainer

        trainer = RingpackSFTTrainer(model=model, args=SFTConfig(**options, padding_free=True, max_length=None,
                                                                 bf16=False),
                                     train_dataset=datasets.Dataset.from_list(data),
                                     processing_class=_tokenizer(config.vocab_size), ringpack=ringpack)
    else:
        trainer = RingpackTrainer(model=model, args=TrainingArguments(**options), train_dataset=data,
                                  ringpack=ringpack)
    if trainer.is_world_process_zero():
        print(f"ringpack: world {trainer.args.world_size} = dp {trainer.dp_size} x cp {trainer.cp_size}, packs of "
              f"<= {args.max_tokens} tokens, {args.model}{' (TRL SFTTrainer)' if args.trl else ''}", flush=True)
    trainer.train()


if __name__ == "__main__":
    main()
