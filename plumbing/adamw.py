"""The optimizer of apo.py: AdamW with fp32 moments for bf16 weights, rounded stochastically. Memory engineering, not
APO: it is what lets full-parameter training of Qwen2.5-VL-3B and its reference fit one 80 GB GPU (docs/PERF.md);
on fp32 weights it is exactly torch.optim.AdamW.
"""

import torch


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up or down at random with probabilities that make the result unbiased: E[out] = x.
    bf16 keeps the top 16 bits of an fp32; adding uniform noise to the 16 bits dropped before truncating does it."""
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # -65536 = 0xFFFF0000


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 moments whatever the weights' dtype, and stochastic rounding for bf16 weights.

    Why: the authors keep fp32 master weights (ZeRO-2 over 8 GPUs). On one GPU, fp32 weights + fp32 Adam for policy
    and reference would take 63 GiB before a single activation. Here the weights are bf16 (2 bytes) and only the
    moments are fp32 (8 bytes). The catch: an Adam update is ~lr = 1e-6 per weight, while bf16 weights of size
    0.02 are 1.2e-4 apart, so rounding to nearest would throw every update away. Stochastic rounding moves a weight
    to the next bf16 value with probability (update / spacing): each weight follows its fp32 trajectory in
    expectation. For fp32 weights this is exactly torch.optim.AdamW (same operations in the same order).

    The update runs on slices of `slice_size` weights: its fp32 temporaries (gradient, denominator, weight, and the
    rounding's noise) take ~24 bytes per weight of a slice, 0.4 GiB, where a whole 151,936 × 2048 embedding would
    take 7 GiB at the moment memory is fullest (weights, moments and gradients all resident).

    The rounding draws from a generator of its own, seeded alike on every rank: data-parallel replicas then round
    alike and stay bit-identical (drawn from each rank's sampling stream, they drifted apart after one bf16 update).
    Under FSDP2 the weights are DTensors: the math runs on each rank's local shard."""

    slice_size = 1 << 24

    def __init__(self, params, lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, seed=0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        device = self.param_groups[0]["params"][0].device
        self.generator = torch.Generator(device).manual_seed(seed)

    def load_state_dict(self, state_dict: dict):
        """As torch's, except that the moments stay fp32: torch casts a loaded state to each weight's dtype, which
        for bf16 weights rounds the moments to bf16 (and the next step then fails on the mix of dtypes)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved = [state_dict["state"].get(i) for group in state_dict["param_groups"] for i in group["params"]]
        for p, state in zip(params, saved):
            for key in ("exp_avg", "exp_avg_sq"):
                if state is not None and key in state:
                    self.state[p][key] = state[key].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # (closure: torch.distributed.checkpoint calls step(closure=None) to build state)
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (a DTensor's shard)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
                state["step"] += 1
                t = state["step"]
                slices = (local(x).view(-1).split(self.slice_size) for x in (p, state["exp_avg"], state["exp_avg_sq"]))
                for w, m, v, grad in zip(*slices, local(p.grad).reshape(-1).split(self.slice_size)):
                    grad = grad.float()
                    m.lerp_(grad, 1 - beta1)                                 # m_t = β1·m + (1 − β1)·g
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)      # v_t = β2·v + (1 − β2)·g²
                    denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)  # √v̂ + ε, v̂ = v_t / (1 − β2^t)
                    weight = w.float().mul_(1 - lr * wd)                     # decoupled decay: w ← w·(1 − lr·λ)
                    weight.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))  # w ← w − lr·m̂/(√v̂ + ε)
                    w.copy_(stochastic_round_to_bf16(weight, self.generator) if w.dtype == torch.bfloat16 else weight)
