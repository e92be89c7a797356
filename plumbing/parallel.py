"""Many GPUs for apo.py: data parallel over torch.distributed, launched by torchrun, and FSDP2 (`--fsdp`) for models
whose weights and Adam moments do not fit one GPU. This file is the whole of that machinery; apo.py and run_folder.py
(loading, checkpoints) meet it only as the calls below, each a no-op (or the identity) in a plain `python apo.py` run,
where there is no process group.

What is split, and why the result equals one process's (README, "Many GPUs"):
- prompts: every rank selects the same B rows (bad rows skipped alike), then takes its contiguous block of B/W
  (`share`). Whole groups stay on one rank, so group advantages, STCR and DADS need no communication;
- the update: each rank's loss divides by the *global* token (or sequence) count of the mini-batch (`total`), and the
  gradients are summed over ranks (`sync_gradients`): the gradient is that of one process on all the responses;
- decisions (skip a non-finite update, stop on a signal) come from reduced values, so no rank diverges or hangs;
- rank 0 alone writes logs, curves and checkpoints (`is_main`); metrics come from every rank's values (`gather`).
With `--fsdp`, each decoder layer and vision block holds 1/W of its weights, gradients and Adam moments (`shard`);
a rollout gathers the whole weights once and generates without communication (`full_weights`); checkpoints are
sharded (torch.distributed.checkpoint), and final/ is gathered on rank 0 (`full_state_dict`).
"""
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def init(device: str) -> tuple:
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...): NCCL on GPUs, gloo on the
    CPU. Returns (rank, world size, this process's device); (0, 1, device) without torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1 or dist.is_initialized():
        return rank(), world(), device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank(), world(), device


def close():
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def share(items: list) -> list:
    """This rank's contiguous block of `items` (equal blocks when len(items) divides by the world size)."""
    n, w, r = len(items), world(), rank()
    return items[r * n // w:(r + 1) * n // w]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor, concatenated along dim 0 in rank order (equal shapes): [W·n, ...]."""
    if world() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def total(values: list, op: str = "sum") -> list:
    """Floats summed (or their max) over ranks; every rank gets the same result."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (e.g. the RNG states a checkpoint keeps per rank)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if world() > 1:
        dist.barrier()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sync_gradients(model):
    """Sum the gradients over ranks, in place, one parameter at a time (no bucket: no second copy of 7 GB).

    The log-probs are computed outside any DDP wrapper's forward (rollout.response_logprobs), so nothing syncs them
    by itself; and each rank's loss already divides by the global token count, so the sum is the gradient.
    Under FSDP2 the reduce-scatter of backward does it (`shard` makes it a sum): nothing to do here."""
    if world() == 1 or is_sharded(model):
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


# ---------------------------------------------------------------------------------------------------------- FSDP2
def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _units(model) -> list:
    """The FSDP2 units of a model, the model itself first; [] for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model):
    """FSDP2: each decoder layer and vision block, then the whole model (embeddings, final norm, vision merger), holds
    1/W of its weights; the optimizer then keeps 1/W of the Adam moments. Gradients are reduce-scattered as sums
    (the loss already divides by global counts), not averaged."""
    from torch.distributed.fsdp import fully_shard

    for block in [*model.model.language_model.layers, *model.model.visual.blocks]:
        fully_shard(block)
    fully_shard(model)
    for unit in _units(model):  # a sum: divide by 1, with plain SUM collectives (gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # FSDP2 takes as its root the first unit to run forward, and `generate` runs the vision tower before the model's
    # own forward: one forward of the whole model first makes it the root.
    # (The root keeps its weights gathered after a forward, for the backward that usually follows: shard them
    # again, so that the optimizer, built next from model.parameters(), gets the sharded ones.)
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device), use_cache=False)
    model.reshard()
    return model


@contextmanager
def full_weights(model):
    """Within: every rank holds the whole weights, gathered once, and forwards communicate nothing. For a rollout:
    gathering layer by layer at each decoding step is ~4× slower, and hangs when ranks' responses differ in length
    (one rank stops decoding, the other waits in an all-gather). Outside: sharded again."""
    units = _units(model)
    for unit in units:
        unit.unshard()
        if unit is not model:
            unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if unit is not model:
                unit.set_reshard_after_forward(True)


def save_sharded(model, optimizer, folder):
    """Weights and Adam moments, each rank its shards (torch.distributed.checkpoint); all ranks call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(model, optimizer, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model) -> dict:
    """The whole weights on rank 0 (on the CPU), for a plain HF final/; {} on other ranks. All ranks call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
