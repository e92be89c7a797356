"""One rank of the multi-process tests (tests/test_parallel.py starts W of these, as torchrun would: RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment, gloo on the CPU). Also the rollout batch those tests share with the single-process
route they compare against.

    python tests/parallel_worker.py TASK MODEL_DIR OUT_DIR [options as JSON]
"""
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import apo  # noqa: E402
from plumbing import models, parallel  # noqa: E402
import rollout  # noqa: E402
from plumbing.adamw import AdamW  # noqa: E402
from conftest import minibatch_gradients  # noqa: E402

# Responses of different lengths (so ranks hold different token counts): 8 responses, 2 prompts × 4.
LENGTHS = [6, 2, 5, 1, 3, 6, 4, 2]


def make_batch(model, processor) -> dict:
    """A rollout batch of the tiny model, the same in every process: sampled with a fixed seed, cut to LENGTHS, with
    advantages, KL weights, and old and reference log-probs that differ from the policy's (so that the clip binds
    and the KL term pulls)."""
    from PIL import Image
    torch.manual_seed(0)
    prompts = rollout.encode_prompts(processor, [Image.new("RGB", (56, 56), c) for c in ("red", "blue")],
                                     ["Find x.", "How many sides?"], 784, 3136)
    batch = rollout.sample_responses(model, processor, prompts, 4, rollout.generation_config(processor, 6, 1.0, 1.0))
    T, P = batch["response_mask"].shape[1], batch["prompt_len"]
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    batch["response_mask"], batch["attention_mask"][:, P:] = mask, mask
    gen = torch.Generator().manual_seed(1)
    batch["advantages"] = torch.randn(8, generator=gen)
    batch["kl_weights"] = torch.rand(8, generator=gen)
    logp, _ = rollout.batched_logprobs(model, batch, 1.0, 8)
    batch["old_logp"] = logp + 0.3 * torch.randn(logp.shape, generator=gen)
    batch["ref_logp"] = logp + 0.5 * torch.randn(logp.shape, generator=gen)
    return batch


def args_for(options: dict) -> apo.Args:
    """The settings of a test; `share`: False for the single-process route, which forwards a copy of the prompt per
    response (the reference layout) where the ranks share each prompt (the default)."""
    return apo.parse_args(["--micro-batch-size", str(options.get("micro", 3)), "--mini-batch-size", "8",
                           "--loss-agg", options.get("agg", "token"), "--lr", "1e-3", "--kl-beta", "0.1"]
                          + ([] if options.get("share", True) else ["--no-share-prompt"]))


def weights_digest(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode() + p.detach().float().numpy().tobytes())
    return digest.hexdigest()


def main():
    task, model_dir, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    rank, world, _ = parallel.init("cpu")
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if options.get("bf16") else torch.float32
    model, processor = models.load_model(model_dir, dtype, torch.device("cpu"))
    if options.get("checkpointing"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch(model, processor)
    model.train()
    args = args_for(options)
    mine = parallel.share(list(range(8)))  # this rank's share of the one mini-batch of 8 responses

    if task == "gradients":  # the gradient of a mini-batch split over the ranks
        stats = minibatch_gradients(model, batch, mine, args)
        torch.save({"grads": {n: p.grad for n, p in model.named_parameters()}, "stats": stats},
                   out / f"gradients-{rank}.pt")
    elif task == "updates":  # optimizer steps, the rows of each mini-batch split over the ranks
        if options.get("fsdp"):
            parallel.shard(model)
        optimizer = AdamW(model.parameters(), lr=1e-3, seed=0)
        local = rollout.select(batch, mine)
        torch.manual_seed(1000 + rank)  # each rank's own global stream, as in training: nothing drawn from it may
        # decide a weight (the rounding draws from the optimizer's generator, seeded alike on every rank)
        for _ in range(options.get("steps", 1)):
            stats = apo.update_policy(model, local, optimizer, args, [1e-3])
        weights = parallel.full_state_dict(model) if options.get("fsdp") else model.state_dict()
        if rank == 0:
            torch.save({"weights": weights, "stats": stats}, out / "weights.pt")
        (out / f"digest-{rank}.txt").write_text(weights_digest(model) if not options.get("fsdp") else "")
    parallel.close()


if __name__ == "__main__":
    main()
