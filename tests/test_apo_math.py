"""The math of apo.py against values worked out by hand (APO_SPEC §2-§8)."""
import math

import pytest
import torch

from apo import (apo_loss, cosine_schedule, dads_kl_weights, grpo_advantages, k3_kl, parse_args, policy_loss,
                 stcr_multiplier)


def whole(mask: torch.Tensor) -> dict:
    """The normalizers of a loss over the whole of `mask`: its token count and its response count."""
    return {"token_total": mask.sum().item(), "seq_total": mask.shape[0]}


# ---------------------------------------------------------------------------------------------------- §2 advantage
def test_grpo_advantages_by_hand():
    # rewards 1.5, 0.5, 0, 0: mean 0.5; deviations 1, 0, -0.5, -0.5; unbiased var = 1.5/3 = 0.5; std = 1/√2
    adv = grpo_advantages(torch.tensor([[1.5, 0.5, 0.0, 0.0]]))
    s = math.sqrt(0.5)
    assert torch.allclose(adv, torch.tensor([[1 / s, 0.0, -0.5 / s, -0.5 / s]]), atol=1e-6)


def test_grpo_advantages_equal_rewards_and_group_of_two():
    adv = grpo_advantages(torch.tensor([[1.5, 1.5, 1.5], [0.0, 0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 3))  # no signal: exactly zero, no NaN
    # G = 2, rewards 1 and 0: mean 0.5, unbiased std = √0.5, advantages ±0.5/√0.5 = ±√0.5
    adv = grpo_advantages(torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[math.sqrt(0.5), -math.sqrt(0.5)]]), atol=1e-6)


def test_grpo_advantages_rows_are_independent():
    rewards = torch.tensor([[1.5, 0.0, 0.5, 1.0], [0.0, 0.5, 0.5, 0.5]])
    both = grpo_advantages(rewards)
    assert torch.allclose(both[1], grpo_advantages(rewards[1:])[0])
    assert torch.allclose(both.sum(-1), torch.zeros(2), atol=1e-6)  # each group is centred


# --------------------------------------------------------------------------------------------------------- §4 STCR
def test_stcr_by_hand():
    correct = torch.tensor([[True, False, False, True]])
    lengths = torch.tensor([[100, 300, 50, 200]])
    # L⁺ = (100 + 200) / 2 = 150. Response 1: wrong, Δ = 150 > 0, w = 1 − 1.00001^−150. Response 2: wrong but
    # shorter (Δ = −100): w = 0. Correct responses: w = 0.
    expected_w = 1 - 1.00001 ** -150
    mult = stcr_multiplier(correct, lengths)
    assert torch.allclose(mult, torch.tensor([[1.0, 1 + expected_w, 1.0, 1.0]], dtype=torch.float32), atol=1e-9)
    assert abs(expected_w - 0.0014989) < 1e-6  # ≈ 1e-5·Δ, the scale APO_SPEC §4 points out


def test_stcr_scale_quoted_in_the_spec():
    # w ≈ 0.01 at 1000 extra tokens and ≈ 0.04 at 4096 (APO_SPEC §4)
    correct = torch.tensor([[True, False, False]])
    mult = stcr_multiplier(correct, torch.tensor([[10, 1010, 4106]]))
    assert mult[0, 1].item() == pytest.approx(1 + (1 - 1.00001 ** -1000), rel=1e-7)
    assert 0.0099 < mult[0, 1].item() - 1 < 0.0100 and 0.0401 < mult[0, 2].item() - 1 < 0.0402


def test_stcr_no_correct_or_all_correct_gives_one():
    lengths = torch.tensor([[10, 500, 900], [10, 500, 900]])
    correct = torch.tensor([[False, False, False], [True, True, True]])
    assert torch.equal(stcr_multiplier(correct, lengths), torch.ones(2, 3))


def test_stcr_base_is_a_knob():
    correct, lengths = torch.tensor([[True, False]]), torch.tensor([[10, 20]])
    assert stcr_multiplier(correct, lengths, base=2.0)[0, 1].item() == pytest.approx(1 + (1 - 2.0 ** -10))
    assert stcr_multiplier(correct, lengths, base=1.0)[0, 1].item() == 1.0  # base 1: STCR off


# --------------------------------------------------------------------------------------------------------- §5 DADS
def test_dads_by_hand():
    # G = 4, one correct: d = 0.75, f = 1 − exp(−e·0.25) = 0.49316...; positives (Â > 0) get f, the others 1
    correct = torch.tensor([[True, False, False, False]])
    adv = torch.tensor([[1.5, -0.5, 0.2, -0.5]])  # response 2 is wrong yet positive (format): DADS tests Â, not acc
    kappa = dads_kl_weights(adv, correct)
    f = 1 - math.exp(-math.e * 0.25)
    assert f == pytest.approx(0.493166, abs=1e-6)
    assert torch.allclose(kappa, torch.tensor([[f, 1.0, f, 1.0]]), atol=1e-6)


def test_dads_easy_prompt_keeps_most_kl_and_edges_are_one():
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5]] * 3)
    correct = torch.tensor([[True, True, True, False],     # d = 0.25: f = 1 − exp(−e·0.75)
                            [True, True, True, True],      # d = 0: f(0) = 1 by definition
                            [False, False, False, False]])  # d = 1: f(1) = 1 by definition
    kappa = dads_kl_weights(adv, correct)
    assert kappa[0, 0].item() == pytest.approx(1 - math.exp(-math.e * 0.75), abs=1e-6)  # 0.8697
    assert torch.equal(kappa[1:], torch.ones(2, 4))


def test_dads_zero_advantage_is_not_positive():
    kappa = dads_kl_weights(torch.zeros(1, 4), torch.tensor([[True, False, False, False]]))
    assert torch.equal(kappa, torch.ones(1, 4))


# ------------------------------------------------------------------------------------------------------- §6 k3 KL
def test_k3_by_hand_and_nonnegative():
    # π_θ = 0.5, π_ref = 0.25: log ratio = ln 0.5; kl = 0.5 − ln 0.5 − 1 = 0.19315
    kl = k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)
    assert k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    g = torch.Generator().manual_seed(0)
    assert (k3_kl(torch.randn(1000, generator=g), torch.randn(1000, generator=g)) >= 0).all()


# ------------------------------------------------------------------------------------------------- §7 policy loss
def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 0.9]]))  # ratios 1.5, 1.1, 0.5, 0.9
    mask = torch.ones(1, 4)
    # Â = +1: per token −min(ρ, clip(ρ)) = −1.2, −1.1, −0.5, −0.9 -> mean −0.925. The clip binds only at ρ = 1.5
    # (ρ = 0.5 is clipped to 0.8, but min(0.5, 0.8) keeps 0.5, the pessimistic choice): clip fraction 1/4
    loss, clip_fraction = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2, agg="token", **whole(mask))
    assert loss.item() == pytest.approx(-0.925, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.25)
    # Â = −1: −min(−ρ, −clip(ρ)) = max(ρ, clip(ρ)) = 1.5, 1.1, 0.8, 0.9 -> mean 1.075; the clip binds at ρ = 0.5
    loss, clip_fraction = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2, agg="token", **whole(mask))
    assert loss.item() == pytest.approx(1.075, abs=1e-6)
    assert clip_fraction.item() == pytest.approx(0.25)
    # the gradient flows only through unclipped tokens: d loss / d ℓ_t = −ρ_t Â / 4 there, 0 where the clip binds
    logp.requires_grad_(True)
    policy_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2, agg="token", **whole(mask))[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1.1 / 4, -0.5 / 4, -0.9 / 4]]), atol=1e-6)


def test_policy_loss_aggregations_and_padding():
    logp = torch.zeros(2, 3)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # ratio 1 everywhere: per-token loss −Â. token mean: (−1·3 + 2·1) / 4 = −0.25; sequence mean: (−1 + 2) / 2 = 0.5
    assert policy_loss(logp, old, adv, mask, clip_eps=0.2, agg="token", **whole(mask))[0].item() == pytest.approx(-0.25)
    assert policy_loss(logp, old, adv, mask, clip_eps=0.2, agg="sequence", **whole(mask))[0].item() == pytest.approx(0.5)
    # padded positions can hold anything: they do not count
    garbage = logp.clone()
    garbage[1, 1:] = 50.0
    assert policy_loss(garbage, old, adv, mask, clip_eps=0.2, agg="token", **whole(mask))[0].item() == pytest.approx(-0.25)


@pytest.mark.parametrize("agg", ["token", "sequence"])
def test_micro_batches_sum_to_the_mini_batch_loss(agg):
    g = torch.Generator().manual_seed(1)
    n, T = 6, 5
    logp, old, ref = (torch.randn(n, T, generator=g) * 0.1 - 1 for _ in range(3))
    adv, kappa = torch.randn(n, generator=g), torch.rand(n, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([5, 1, 3, 4, 2, 5])[:, None]).long()
    at_once, _ = apo_loss(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, kl_weights=kappa, mask=mask,
                          kl_beta=0.1, clip_eps=0.2, agg=agg, **whole(mask))
    parts = sum(apo_loss(logp=logp[s], old_logp=old[s], ref_logp=ref[s], advantages=adv[s], kl_weights=kappa[s],
                         mask=mask[s], kl_beta=0.1, clip_eps=0.2, agg=agg, token_total=mask.sum().item(),
                         seq_total=n)[0] for s in (slice(0, 2), slice(2, 3), slice(3, 6)))
    assert parts.item() == pytest.approx(at_once.item(), abs=1e-6)


def test_grpo_baseline_loss_matches_an_independent_computation():
    """--no-dads --no-stcr: the loss is GRPO's clipped objective + β·mean_i KL_i, written here as plain loops."""
    g = torch.Generator().manual_seed(2)
    B, G, T, beta, eps = 2, 4, 6, 0.05, 0.2
    rewards = torch.tensor([[1.5, 0.5, 0.0, 1.5], [0.5, 0.5, 1.0, 0.0]])
    lengths = torch.tensor([6, 2, 4, 5, 3, 6, 1, 4])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    logp = -torch.rand(B * G, T, generator=g) - 0.5
    old = logp + 0.3 * torch.randn(B * G, T, generator=g)
    ref = logp + 0.3 * torch.randn(B * G, T, generator=g)
    adv = grpo_advantages(rewards).flatten()
    loss, _ = apo_loss(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, kl_weights=torch.ones(B * G),
                       mask=mask, kl_beta=beta, clip_eps=eps, agg="token", **whole(mask))

    pg_terms, kls = [], []
    for i in range(B * G):
        group = rewards.flatten()[i // G * G:(i // G + 1) * G].tolist()
        mean = sum(group) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        a = (rewards.flatten()[i].item() - mean) / (std + 1e-9)
        kl_i = 0.0
        for t in range(int(lengths[i])):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            pg_terms.append(-min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
            d = ref[i, t].item() - logp[i, t].item()
            kl_i += math.exp(d) - d - 1
        kls.append(kl_i / int(lengths[i]))
    expected = sum(pg_terms) / len(pg_terms) + beta * sum(kls) / len(kls)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_dads_weights_scale_only_the_kl_term():
    logp, old, ref = torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2, 3), -0.5)
    mask, adv = torch.ones(2, 3), torch.tensor([1.0, -1.0])
    kl_token = math.exp(-0.5) + 0.5 - 1
    for kappa in ([1.0, 1.0], [0.25, 1.0]):
        loss, stats = apo_loss(logp=logp, old_logp=old, ref_logp=ref, advantages=adv, kl_weights=torch.tensor(kappa),
                               mask=mask, kl_beta=1.0, clip_eps=0.2, agg="token", **whole(mask))
        assert stats["kl_loss"] == pytest.approx(kl_token * sum(kappa) / 2, abs=1e-6)
        assert stats["kl"] == pytest.approx(kl_token, abs=1e-6)  # the logged KL is unweighted
        assert stats["pg_loss"] == pytest.approx(0.0, abs=1e-7)
        assert stats["loss"] == pytest.approx(loss.item())


def test_gradient_of_kl_pulls_toward_reference():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = apo_loss(logp=logp, old_logp=None, ref_logp=torch.tensor([[-1.5, -1.5]]), advantages=torch.zeros(1),
                       kl_weights=torch.ones(1), mask=torch.ones(1, 2), kl_beta=1.0, clip_eps=0.2, agg="token",
                       token_total=2, seq_total=1)
    loss.backward()
    # d/dℓ_θ [e^(ℓ_ref−ℓ_θ) − (ℓ_ref−ℓ_θ) − 1] = 1 − e^(ℓ_ref−ℓ_θ), halved by the mean over 2 tokens
    expected = [(1 - math.exp(-0.5)) / 2, (1 - math.exp(0.5)) / 2]
    assert torch.allclose(logp.grad, torch.tensor([expected]), atol=1e-6)


# --------------------------------------------------------------------------------------------------- §8 schedule
def test_cosine_schedule():
    lr, min_lr, total = 1e-6, 1e-7, 100  # 3% warmup = 3 steps
    values = [cosine_schedule(s, total, 0.03, lr, min_lr) for s in range(total + 1)]
    assert values[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr])
    assert values[3] == pytest.approx(lr)                                    # cosine starts at the peak
    assert values[3 + 97 // 2] == pytest.approx((lr + min_lr) / 2, rel=0.02)  # halfway: the midpoint
    assert values[100] == pytest.approx(min_lr)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))


# --------------------------------------------------------------------------------------------------------- flags
def test_flags_presets_and_overrides():
    args = parse_args(["--no-dads", "--no-stcr"])
    assert (args.dads, args.stcr, args.group_size, args.lr) == (False, False, 8, 1e-6)
    authors = parse_args(["--preset", "authors"])
    assert (authors.prompts_per_step, authors.max_new_tokens, authors.shuffle) == (128, 4096, False)
    assert parse_args(["--preset", "authors", "--max-new-tokens", "512"]).max_new_tokens == 512  # explicit wins
    assert parse_args(["--data", "toy"]).model == "toy"
    assert parse_args(["--adam-betas", "0.8", "0.9"]).adam_betas == (0.8, 0.9)
    with pytest.raises(SystemExit):
        parse_args(["--group-size", "1"])
    with pytest.raises(SystemExit):
        parse_args(["--loss-agg", "median"])
    with pytest.raises(SystemExit):
        parse_args(["--dtype", "float16"])
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
