"""plumbing/adamw.py against independent routes: fp32 AdamW is torch.optim.AdamW; bf16 AdamW follows the fp32
update in expectation, through stochastic rounding, which is unbiased and lands on a neighbour."""
import math

import pytest
import torch

from plumbing import adamw
from plumbing.adamw import AdamW

Z = 5  # statistical tests: |z| < 5 fails a correct implementation with probability 6e-7 (and the seeds are fixed)


# ------------------------------------------------------------------------------------------------------ AdamW
def test_adamw_fp32_equals_torch_adamw(monkeypatch):
    """fp32 weights: the same numbers as torch.optim.AdamW, bit for bit, over several steps, with weight decay and
    gradients of very different scales; slices smaller than a parameter change nothing."""
    monkeypatch.setattr(adamw.AdamW, "slice_size", 100)  # the 64×33 and 1000-long parameters span several slices
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 33), (1000,), (7, 5, 3), (1,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    kwargs = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_ours, opt_theirs = adamw.AdamW(ours, **kwargs), torch.optim.AdamW(theirs, foreach=False, **kwargs)
    for _ in range(6):
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen) * 10.0 ** torch.randint(-6, 2, a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert torch.equal(opt_ours.state[a]["exp_avg"], opt_theirs.state[b]["exp_avg"])
        assert torch.equal(opt_ours.state[a]["exp_avg_sq"], opt_theirs.state[b]["exp_avg_sq"])


def test_adamw_bf16_small_lr_moves_weights_as_fp32_in_expectation(monkeypatch):
    """bf16 weights, lr 1e-6, one step. The weights lie in one binade, (2^-6, 2^-5), where bf16 values are
    s = 2^-13 ≈ 1.2e-4 apart, and all gradients are positive: Adam's first step moves each weight down by
    u_i = lr·g_i/(|g_i| + ε) ≈ 1e-6 = s/122. Round-to-nearest keeps every weight (u < s/2). Stochastic rounding
    moves weight i one spacing down with probability u_i/s, so its change Δ_i ∈ {0, −s} has mean −u_i and variance
    u_i(s − u_i): Σ Δ_i must lie within Z standard deviations of −Σ u_i (5σ is ±5% of the mean update here)."""
    monkeypatch.setattr(adamw.AdamW, "slice_size", 1 << 18)  # four slices
    n, lr, eps, s = 1 << 20, 1e-6, 1e-8, 2.0 ** -13
    gen = torch.Generator().manual_seed(1)
    magnitude = 2.0 ** -6 + s + torch.rand(n, generator=gen) * (2.0 ** -6 - 2 * s)  # away from the binade's edges
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    w0 = (sign * magnitude).to(torch.bfloat16)
    weight = torch.nn.Parameter(w0.clone())
    weight.grad = (1e-3 + torch.rand(n, generator=gen)).to(torch.bfloat16)  # positive: every weight moves down
    adamw.AdamW([weight], lr=lr, eps=eps).step()

    g = weight.grad.double()
    u = lr * g / (g.abs() + eps)                                 # the fp32 (exact) update, float64 here
    assert torch.equal((w0.double() - u).to(torch.bfloat16), w0)  # round-to-nearest would change no weight at all
    delta = weight.detach().double() - w0.double()
    assert ((delta == 0) | (delta == -s)).all()                  # one of the two neighbours, never further
    changed = int((delta != 0).sum())
    assert changed > 0
    z = (delta.sum() + u.sum()) / (u * (s - u)).sum().sqrt()
    assert abs(z.item()) < Z, (changed, z.item())


# ----------------------------------------------------------------------------------------- stochastic rounding
def bf16_neighbours(x: torch.Tensor):
    """The bf16 values just below and above each x (equal when x is a bf16 value), by torch's own round-to-nearest
    conversion and nextafter: independent of the bit arithmetic of adamw.stochastic_round_to_bf16."""
    nearest = x.to(torch.bfloat16)
    down = torch.nextafter(nearest, torch.full_like(nearest, -math.inf))
    up = torch.nextafter(nearest, torch.full_like(nearest, math.inf))
    exact = nearest.float() == x
    lo = torch.where(exact | (nearest.float() < x), nearest, down)
    hi = torch.where(exact | (nearest.float() > x), nearest, up)
    return lo, hi


def test_stochastic_rounding_lands_on_a_neighbour():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (200_000,), generator=gen).float()
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -2.5, 1e-40, -3e-39, 3.0e38])])  # exact values, subnormals
    out = adamw.stochastic_round_to_bf16(x)
    lo, hi = bf16_neighbours(x)
    assert out.dtype == torch.bfloat16
    assert ((out == lo) | (out == hi)).all()
    representable = x.to(torch.bfloat16).float() == x
    assert representable.sum() >= 6 and torch.equal(out[representable].float(), x[representable])
    special = torch.tensor([math.inf, -math.inf, math.nan])
    assert torch.equal(adamw.stochastic_round_to_bf16(special)[:2].float(), special[:2])
    assert adamw.stochastic_round_to_bf16(special)[2].isnan()


@pytest.mark.parametrize("lo_value, fraction", [(1.0, 0.1), (1.0, 0.5), (-3.0, 0.9), (2.0 ** -100, 0.3),
                                                (1e-39, 0.7)])  # the last in the subnormal range
def test_stochastic_rounding_is_unbiased(lo_value, fraction):
    """x at a known fraction of the way between two bf16 neighbours lo < hi (or hi < lo for negative numbers):
    the share rounded away from lo is Binomial(K, fraction)/K, and so the mean of the results is x."""
    lo = torch.tensor([lo_value], dtype=torch.bfloat16)
    hi = torch.nextafter(lo, torch.tensor([math.copysign(math.inf, lo_value)], dtype=torch.bfloat16))
    x = lo.double() + fraction * (hi.double() - lo.double())
    K = 200_000
    torch.manual_seed(3)
    out = adamw.stochastic_round_to_bf16(x.float().expand(K).contiguous())
    assert ((out == lo) | (out == hi)).all()
    away = (out == hi).sum().item()
    p = ((x.float().double() - lo.double()) / (hi.double() - lo.double())).item()  # x as fp32 (it is rounded once)
    assert abs(away - K * p) < Z * math.sqrt(K * p * (1 - p))


def test_stochastic_rounding_mean_error_is_zero():
    """Over many different x, Σ (round(x) − x) has mean 0 and variance Σ (x − lo)(hi − x)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1_000_000, generator=gen) * 0.02
    torch.manual_seed(5)
    err = adamw.stochastic_round_to_bf16(x).double() - x.double()
    lo, hi = bf16_neighbours(x)
    variance = ((x.double() - lo.double()) * (hi.double() - x.double())).sum()
    assert abs(err.sum() / variance.sqrt()).item() < Z
    nearest_err = (x.to(torch.bfloat16).double() - x.double()).abs().sum()
    assert err.abs().sum() > nearest_err  # (it is noisier than round-to-nearest: the price of being unbiased)


def test_adamw_matches_torch_on_fp32():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(20, 7))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = AdamW([w1], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([w2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(20, 7)
        w1.grad, w2.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert torch.allclose(w1, w2, atol=1e-6, rtol=1e-5)
