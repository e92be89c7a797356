"""The loop's wiring, through what a run does: a real step of `apo.train` on the toy's starting model (it writes the
format and guesses letters, so rewards differ within groups and every update moves the weights) gives the gradient
of the APO loss written out here term by term, from the step's own responses; the clip binds where it should; the
held-out evaluations are greedy. The math functions are tested by hand in test_apo_math.py; these tests catch
what wires them together: a term left out, a wrong flag passed on, a stale log-prob."""
import json
import math

import pytest
import torch

from plumbing import adamw, data, models, toy
import apo
import eval as evaluate
import reward
import rollout
from conftest import minibatch_gradients



def loop_args(data, out, *extra):
    return ["--model", "toy", "--data", str(data), "--out", str(out), "--no-shuffle", "--eval-every", "0",
            "--save-every", "1000", "--log-samples", "1", "--max-new-tokens", "24", *extra]


class Spy:
    """Records, without changing them, what a run's step is made of: each rollout batch, each optimizer step's
    gradients and the weights it started from, and the responses of each mini-batch (those of the micro-batches
    that the update selects before each optimizer step)."""

    def __init__(self, monkeypatch):
        self.rollouts, self.steps, self.minibatch_rows, self.micro_rows = [], [], [], []
        sample, step, select = rollout.sample_responses, adamw.AdamW.step, rollout.select

        def sample_responses(*args, **kwargs):
            batch = sample(*args, **kwargs)
            self.rollouts.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
            return batch

        def optimizer_step(optimizer, *args, **kwargs):
            params = optimizer.param_groups[0]["params"]
            self.steps.append({"grads": [p.grad.detach().clone() for p in params],
                               "weights": [p.detach().clone() for p in params]})
            self.minibatch_rows.append(self.micro_rows)
            self.micro_rows = []
            return step(optimizer, *args, **kwargs)

        def select_rows(batch, rows):
            if "advantages" in batch:  # a micro-batch of the update
                self.micro_rows = self.micro_rows + list(rows)
            return select(batch, rows)

        monkeypatch.setattr(rollout, "sample_responses", sample_responses)
        monkeypatch.setattr(adamw.AdamW, "step", optimizer_step)
        monkeypatch.setattr(rollout, "select", select_rows)


def model_with(weights: list):
    """The toy's starting model with `weights` (in model.parameters() order, as the optimizer holds them)."""
    model, _ = models.load_model("toy", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    return model


def naive_logprobs(model, batch, rows, temperature) -> list:
    """Per response of `rows`: log π(o_t | prefix) at `temperature` from the model's full logits, one response at a
    time (an independent route: no chunks, no hidden states, no micro-batches). A list of [|o_i|] tensors."""
    out = []
    for i in rows:
        one = rollout.select(batch, [i])
        logits = model(**{k: one[k] for k in rollout.MODEL_INPUTS}).logits[0]            # [P + T, V]
        n, P = int(batch["lengths"][i]), batch["prompt_len"]
        targets = one["input_ids"][0, P:P + n]
        out.append((logits[P - 1:P - 1 + n] / temperature).log_softmax(-1).gather(-1, targets[:, None])[:, 0])
    return out


def apo_terms(texts, lengths, golds, G, stcr_base, dads=True, stcr=True, correct_by=None) -> dict:
    """Â, κ and what goes into them, for every response, worked out with plain Python from the formulas
    (APO_SPEC §1-§5): lists over the responses, and the difficulty d over the groups."""
    acc = [reward.accuracy_reward(t, g) for t, g in zip(texts, golds)]
    r = [a + reward.format_reward(t) for a, t in zip(acc, texts)]
    correct = [c > 0 for c in (correct_by or acc)]
    out = {"rewards": r, "accuracy": acc, "advantages0": [], "multipliers": [], "advantages": [], "kappas": [],
           "difficulty": []}
    for g in range(len(texts) // G):
        idx = range(g * G, (g + 1) * G)
        mean = sum(r[i] for i in idx) / G
        std = math.sqrt(sum((r[i] - mean) ** 2 for i in idx) / (G - 1))
        k = sum(correct[i] for i in idx)
        L_plus = sum(lengths[i] for i in idx if correct[i]) / k if k else None
        d = 1 - k / G
        f = 1.0 if d in (0, 1) else 1 - math.exp(-math.e * (1 - d))
        out["difficulty"].append(d)
        for i in idx:
            a0 = (r[i] - mean) / (std + 1e-9)
            delta = lengths[i] - L_plus if L_plus is not None else 0
            w = 1 - stcr_base ** -delta if stcr and not correct[i] and k and delta > 0 else 0.0
            out["advantages0"].append(a0)
            out["multipliers"].append(1 + w)
            out["advantages"].append((1 + w) * a0)
            out["kappas"].append(f if dads and out["advantages"][-1] > 0 else 1.0)
    return out


def hand_gradient(weights, batch, rows, old_weights, advantages, kappas, args, policy_temperature=None):
    """∇ of L = L_pg + β·L_kl over the responses `rows` (APO_SPEC §6-§7), L_pg the token mean of
    −min(ρÂ, clip(ρ, 1±ε)Â) with ρ = π_θ/π_old, L_kl the mean over responses of κ·(token mean of k3).
    Returns (gradients in parameter order, the share of tokens where the clip binds). `policy_temperature`:
    ℓ_θ alone at another temperature (a fault to show that the test would see it)."""
    policy = model_with(weights)
    logp = naive_logprobs(policy, batch, rows, policy_temperature or args.temperature)
    with torch.no_grad():
        old = naive_logprobs(model_with(old_weights), batch, rows, args.temperature)
        ref = naive_logprobs(model_with(STARTING), batch, rows, args.temperature)
    n_tokens = sum(len(x) for x in logp)
    pg, kl, clipped = 0.0, 0.0, 0
    for lp, lo, lr, i in zip(logp, old, ref, rows):
        ratio, a = (lp - lo).exp(), advantages[i]
        pg = pg - torch.minimum(ratio * a, ratio.clamp(1 - args.clip_eps, 1 + args.clip_eps) * a).sum() / n_tokens
        clipped += int(((ratio.clamp(1 - args.clip_eps, 1 + args.clip_eps) * a) < ratio * a).sum())
        k3 = (lr - lp).exp() - (lr - lp) - 1
        kl = kl + kappas[i] * k3.mean() / len(rows)
    (pg + args.kl_beta * kl).backward()
    return [p.grad for p in policy.parameters()], clipped / n_tokens


STARTING = None  # the starting model's weights, set by the fixture below


@pytest.fixture(scope="module", autouse=True)
def starting_weights():
    global STARTING
    model, _ = models.load_model("toy", torch.float32, torch.device("cpu"))
    STARTING = [p.detach().clone() for p in model.parameters()]


def assert_same_gradient(got: list, expected: list):
    scale = max(g.abs().max().item() for g in expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5 * scale)


def gradient_distance(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b)) / max(x.abs().max().item() for x in b)


@pytest.mark.parametrize("method", ["apo", pytest.param("grpo", marks=pytest.mark.slow)])  # APO: the fast tier
def test_a_step_gives_the_gradient_of_the_apo_loss_written_out(toy_dir, tmp_path, monkeypatch, method):
    """The second step of a run (the policy has moved, so the KL term pulls) at temperature 1.3, β = 0.5 and an
    STCR base of 1.5 (so that 1 + w is far from 1): the gradient the optimizer receives is that of the loss written
    out from the step's own responses, golds and the formulas. In this batch κ < 1 and 1 + w > 1 for some
    responses, and some wrong ones carry a format reward, so leaving out DADS or STCR, counting a response correct
    by its reward, or scoring the log-probs at temperature 1 all give another gradient (checked below)."""
    spy = Spy(monkeypatch)
    flags = ["--prompts-per-step", "6", "--group-size", "8", "--mini-batch-size", "48", "--micro-batch-size", "5",
             "--temperature", "1.3", "--kl-beta", "0.5", "--stcr-base", "1.5", "--grad-clip", "1e9", "--lr", "1e-3",
             "--steps", "2", "--log-samples", "6"] + (["--no-dads", "--no-stcr"] if method == "grpo" else [])
    args = apo.parse_args(loop_args(toy_dir, tmp_path / "run", *flags))
    apo.train(args)
    assert len(spy.steps) == 2  # one optimizer step per rollout: on-policy, ℓ_old = ℓ_θ
    batch, step = spy.rollouts[1], spy.steps[1]
    golds = [r["answer"] for r in toy.toy_rows("train", seed=0)[6:12] for _ in range(8)]  # step 1: rows 6-11
    lengths = batch["lengths"].tolist()
    rows = list(range(48))
    is_apo = method == "apo"
    terms = apo_terms(batch["texts"], lengths, golds, 8, 1.5, is_apo, is_apo)
    advantages, kappas = terms["advantages"], terms["kappas"]
    expected, _ = hand_gradient(step["weights"], batch, rows, step["weights"], advantages, kappas, args)
    assert_same_gradient(step["grads"], expected)
    # samples.jsonl carries each logged response's numbers: those worked out here
    logged = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in logged] == [0] * 6 + [1] * 6  # --log-samples 6: every group of the step
    for g, sample in enumerate(logged[6:]):
        group = slice(8 * g, 8 * g + 8)
        assert sample["row"] == 6 + g and sample["answer"] == golds[8 * g]  # no shuffle: rows 6-11
        assert sample["responses"] == batch["texts"][group] and sample["lengths"] == lengths[group]
        assert sample["correct"] == [a > 0 for a in terms["accuracy"][group]]
        assert sample["rewards"] == pytest.approx(terms["rewards"][group])
        assert sample["difficulty"] == pytest.approx(terms["difficulty"][g])
        for key, name in (("advantages0", "advantages0"), ("stcr_multipliers", "multipliers"),
                          ("advantages", "advantages"), ("kl_weights", "kappas")):
            assert sample[key] == pytest.approx(terms[name][group], rel=1e-5, abs=1e-6), key
    # each response's KL_i (its update's ℓ_θ against the reference, token mean of k3), and the step's metrics that
    # read it and κ: worked out here from the same weights
    with torch.no_grad():
        policy_logp = naive_logprobs(model_with(step["weights"]), batch, rows, args.temperature)
        ref_logp = naive_logprobs(model_with(STARTING), batch, rows, args.temperature)
    kl = [((r - lp).exp() - (r - lp) - 1).mean().item() for lp, r in zip(policy_logp, ref_logp)]
    for g, sample in enumerate(logged[6:]):
        assert sample["kl"] == pytest.approx(kl[8 * g:8 * g + 8], rel=1e-4, abs=1e-7)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    right = [a > 0 for a in terms["accuracy"]]
    k_of = [sum(right[8 * (i // 8):8 * (i // 8) + 8]) for i in range(48)]
    right_positive = [k for k, r, a in zip(kappas, right, advantages) if r and a > 0]
    assert metrics["dads_weight_correct_mean"] == pytest.approx(sum(right_positive) / len(right_positive))
    hard_right = [x for x, r, k in zip(kl, right, k_of) if r and 1 <= k <= 3]
    assert hard_right and metrics["kl_correct_hard"] == pytest.approx(sum(hard_right) / len(hard_right), rel=1e-4)
    print(f"\n{method}: gradient off by {gradient_distance(step['grads'], expected):.1e} of its largest entry")

    if is_apo:  # the batch is one where each wiring fault changes the gradient
        plain = apo_terms(batch["texts"], lengths, golds, 8, 1.5, False, False)
        plain_adv, plain_kappa = plain["advantages"], plain["kappas"]
        assert min(kappas) < 0.9 and max(a / b for a, b in zip(advantages, plain_adv) if b) > 1.05
        wrong_correct = apo_terms(batch["texts"], lengths, golds, 8, 1.5, correct_by=[x > 0 for x in terms["rewards"]])
        by_reward, by_reward_kappa = wrong_correct["advantages"], wrong_correct["kappas"]
        for wrong_adv, wrong_kappa in ((plain_adv, kappas), (advantages, plain_kappa),
                                       (by_reward, by_reward_kappa)):
            other, _ = hand_gradient(step["weights"], batch, rows, step["weights"], wrong_adv, wrong_kappa, args)
            assert gradient_distance(other, expected) > 1e-3  # (the loop agrees with `expected` to ~1e-6)
        other, _ = hand_gradient(step["weights"], batch, rows, step["weights"], advantages, kappas, args, 1.0)
        assert gradient_distance(other, expected) > 1e-3


@pytest.mark.slow  # a step of 4 optimizer steps, each checked against the loss written out
def test_off_policy_steps_use_the_rollout_time_policy_and_the_clip_binds(toy_dir, tmp_path, monkeypatch):
    """32 responses in 4 mini-batches of 8, lr 0.01: after the first optimizer step the policy has moved, so ρ =
    π_θ/π_old ≠ 1 and the clip binds on some tokens. Each step's gradient is that of the loss written out with
    ℓ_old from the weights that sampled the rollout (not the current ones: that would make ρ = 1)."""
    spy = Spy(monkeypatch)
    args = apo.parse_args(loop_args(toy_dir, tmp_path / "run", "--prompts-per-step", "4", "--group-size", "8",
                                    "--mini-batch-size", "8", "--micro-batch-size", "3", "--lr", "1e-2",
                                    "--kl-beta", "0.1", "--grad-clip", "1e9", "--steps", "1"))
    apo.train(args)
    batch, steps = spy.rollouts[0], spy.steps
    assert len(steps) == 4 and sorted(sum(spy.minibatch_rows, [])) == list(range(32))
    golds = [r["answer"] for r in toy.toy_rows("train", seed=0)[:4] for _ in range(8)]
    terms = apo_terms(batch["texts"], batch["lengths"].tolist(), golds, 8, args.stcr_base)
    advantages, kappas = terms["advantages"], terms["kappas"]
    rollout_weights = steps[0]["weights"]
    clipped_shares = []
    for step, rows in zip(steps, spy.minibatch_rows):
        expected, clipped = hand_gradient(step["weights"], batch, rows, rollout_weights, advantages, kappas, args)
        assert_same_gradient(step["grads"], expected)
        clipped_shares.append(clipped)
    assert clipped_shares[0] == 0 and max(clipped_shares[1:]) > 0.02, clipped_shares
    # ℓ_old taken from the current weights would have given another gradient
    stale, _ = hand_gradient(steps[3]["weights"], batch, spy.minibatch_rows[3], steps[3]["weights"], advantages,
                             kappas, args)
    assert gradient_distance(stale, hand_gradient(steps[3]["weights"], batch, spy.minibatch_rows[3],
                                                  rollout_weights, advantages, kappas, args)[0]) > 1e-3


def test_the_on_policy_shortcut_gives_the_gradient_of_a_separate_pass(toy_dir, tmp_path, monkeypatch):
    """One mini-batch per rollout: ℓ_old is ℓ_θ itself, detached (no forward pass for it). The gradient equals the
    one from ℓ_old computed by a separate pass over the same weights, as with several mini-batches."""
    spy = Spy(monkeypatch)
    args = apo.parse_args(loop_args(toy_dir, tmp_path / "run", "--prompts-per-step", "2", "--group-size", "8",
                                    "--mini-batch-size", "16", "--micro-batch-size", "16", "--steps", "1"))
    apo.train(args)
    batch = dict(spy.rollouts[0])
    model = model_with(spy.steps[0]["weights"])
    grads = []
    for old_logp in (None, rollout.batched_logprobs(model, batch, args.temperature, 4)[0]):
        copy = model_with(spy.steps[0]["weights"])
        one = {**batch, "ref_logp": rollout.batched_logprobs(model_with(STARTING), batch, args.temperature, 4)[0]}
        golds = [r["answer"] for r in toy.toy_rows("train", seed=0)[:2] for _ in range(8)]
        terms = apo_terms(batch["texts"], batch["lengths"].tolist(), golds, 8, args.stcr_base)
        one.update(advantages=torch.tensor(terms["advantages"]), kl_weights=torch.tensor(terms["kappas"]))
        if old_logp is not None:
            one["old_logp"] = old_logp
        copy.zero_grad()
        minibatch_gradients(copy, one, list(range(16)), args)
        grads.append([p.grad.clone() for p in copy.parameters()])
    assert_same_gradient(grads[0], grads[1])
    assert_same_gradient(spy.steps[0]["grads"], grads[1])


def greedy_by_hand(model, processor, examples, max_new_tokens) -> list:
    """Greedy answers decoded one token at a time from the model's full logits (no cache, no generate): at each
    position the likeliest token that is not a vision token, up to an end-of-turn token or the limit."""
    tok = processor.tokenizer
    ends = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    banned = tok.convert_tokens_to_ids(rollout.VISION_TOKENS)
    texts = []
    for e in examples:
        prompt = rollout.encode_prompts(processor, [e["images"]], [e["problem"]], 28 * 28, toy.IMAGE_SIZE ** 2)
        ids, out = prompt["input_ids"], []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"],
                                                            torch.zeros(1, len(out), dtype=torch.long)], 1),
                               pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"]).logits
                logits[0, -1, banned] = -torch.inf
                token = int(logits[0, -1].argmax())
                if token in ends:
                    break
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        texts.append(tok.decode(out, skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_held_out_evaluations_are_greedy_in_training_and_in_eval(toy_dir, tmp_path):
    """The starting model's greedy answers to the 16 held-out problems, decoded by hand: the run's step-0
    evaluation reports their accuracy, format rate and length, and eval.py writes exactly those responses. (Sampled
    at T = 1, this model breaks its format about one time in eight: a sampling evaluation would not match.)"""
    model, processor = models.load_model("toy", torch.float32, torch.device("cpu"))
    table, base, columns = data.load_table(str(toy_dir), "test")
    examples = [data.prepare_example(table[i], columns, base) for i in range(16)]
    texts = greedy_by_hand(model, processor, examples, 24)
    correct = [reward.accuracy_reward(t, e["answer"]) for t, e in zip(texts, examples)]
    assert 0 < sum(correct) < 16  # the model guesses: some right, some wrong

    out = apo.train(apo.parse_args(loop_args(toy_dir, tmp_path / "run", "--eval-every", "1", "--steps", "1",
                                             "--prompts-per-step", "2", "--group-size", "4")))
    step0 = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()][0]
    assert step0["step"] == 0 and step0["problems"] == 16
    assert step0["accuracy"] == sum(correct) / 16
    assert step0["format_rate"] == sum(reward.format_reward(t) > 0 for t in texts) / 16
    lengths = [len(processor.tokenizer(t)["input_ids"]) + 1 for t in texts]  # + the end-of-turn token
    assert step0["response_length"] == pytest.approx(sum(lengths) / 16)

    report = evaluate.main(["--model", "toy", "--data", str(toy_dir), "--split", "test", "--max-new-tokens", "24",
                            "--out", str(tmp_path / "eval.json")])
    records = report["responses"]["toy"][str(toy_dir)]
    assert [r["response"] for r in records] == texts
