"""The README's screenshot (docs/explain.png): a run folder of hand-written responses to the ten real geometry3k
problems of tests/data, rendered by the page every run gets (`pictures.explain`, `eval.py --explain RUN`).

    python tools/explain_demo.py --out runs/geo3k-handwritten     # then open runs/geo3k-handwritten/explain.html
    chromium --headless --no-sandbox --hide-scrollbars --window-size=1200,1600 --screenshot=docs/explain.png \
        file://$PWD/runs/geo3k-handwritten/explain.html                   # (then 256 colours: a third of the bytes)

A random model writes no answers worth reading, so the responses here are written by hand: LaTeX and unicode answers,
right ones in several forms, wrong values, an approximation, a sentence with two values, an unformatted one, one cut
at the token limit, a group with no signal. Their rewards, advantages, STCR's 1 + w, DADS's κ and d come from
reward.py and apo.py, as a step computes them; their token counts are set by hand, and so is KL_i (0 at step 0,
where the policy is the reference; small after). metrics.jsonl holds these groups' own means.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import apo  # noqa: E402
import reward  # noqa: E402
from conftest import geo3k_rows, write_hub_layout  # noqa: E402
from plumbing import pictures  # noqa: E402

MAX_NEW_TOKENS = 96


def T(think: str, answer: str) -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# (step, chosen, data row, [(response, tokens, cut at the token limit)])
GROUPS = [
    (0, "first", 4, [  # Find y (hypotenuse 10, 60°): 5√3
        (T(r"The hypotenuse is 10 and y is opposite the 60° angle, so y = 10 \sin 60° = "
           r"10 \cdot \frac{\sqrt{3}}{2}.", r"5\sqrt{3}"), 41, False),
        (T("y is opposite the 60° angle: y = 10·sin 60° = 5√3 ≈ 8.66.", "y = 5√3"), 33, False),
        (T("y is next to the 60° angle, so y = 10 cos 60° = 5.", "5"), 27, False),
        (r"y is opposite the 60° angle, so y = 10 \sin 60^\circ = \boxed{5\sqrt{3}}", 30, False),
        (T("y = 10 sin 60° = 8.66", "8.66"), 24, False),
        (r"<think>Let me use the Pythagorean theorem. x = 10 \cos 60° = 5, so x^2 + y^2 = 100 gives "
         r"y^2 = 100 - 25 = 75, and y = \sqrt{75} = \sqrt{25 \cdot 3}, which is", MAX_NEW_TOKENS, True)]),
    (0, "random", 8, [  # Find sin x (the kite): 2√2/5
        (T(r"The diagonals are perpendicular and AB = 8, with the two half-diagonals at B equal: each is 4\sqrt{2}. "
           r"So \sin x = \frac{4\sqrt{2}}{10}.", r"\frac{2\sqrt{2}}{5}"), 52, False),
        (T("sin x = opposite / hypotenuse = 4√2 / 10.", r"\sin x = \frac{2\sqrt2}{5}"), 30, False),
        (T(r"The opposite side is \sqrt{2} and the hypotenuse 5.", r"\frac{\sqrt{2}}{5}"), 28, False),
        (T("The half-diagonal is 4√2 and AD = 10.", r"AC/2 = 4\sqrt{2}, so \sin x = \frac{2\sqrt{2}}{5}"), 38, False),
        (T("4√2/10 ≈ 0.566", "0.57"), 22, False),
        (T("sin x = 4√2/10", "2√2/5"), 19, False)]),
    (1, "first", 0, [  # equal chords, equal arcs: 80
        (T("Chords AB and CD are equal (30), so their arcs are equal. Arc CZ is half of arc CD, so arc CD = 80.", "80"),
         45, False),
        (T("Equal chords cut equal arcs; arc CD = 2 · 40°.", "80°"), 26, False),
        (T("The arc is 40.", "40"), 12, False),
        (T("Equal chords, equal arcs: arc CD = 80.", r"m\widehat{AB} = 80"), 25, False),
        (T("The choices are 30, 40, 60, 80.", "The answer is D"), 20, False),
        (T("Arc AB equals arc CD.", " "), 14, False)]),
    (1, "random", 6, [  # ∠Q of parallelogram MNPQ: 120; every response 60, no signal
        (T("Consecutive angles are supplementary: 10x + 20x = 180, so x = 6 and ∠M = 60, and ∠Q = ∠M.", "60"),
         40, False),
        (T("30x = 180, x = 6; ∠Q = 10x.", "60"), 21, False),
        (T("x = 6, ∠Q = 60°", r"60^\circ"), 18, False),
        (T("∠Q = ∠M = 60", "60"), 15, False),
        (T("10x = 60", "60"), 12, False),
        (T("x = 6", r"\angle Q = 60"), 13, False)]),
    (2, "first", 1, [  # two secants: 13
        (T(r"Two secants from A: AB \cdot AD = AC \cdot AE, so 5(5 + x) = 7.5(7.5 + 4.5) = 90 and 5 + x = 18.", "13"),
         44, False),
        (T("5(5 + x) = 7.5 · 12 = 90, so x = 13.", "x = 13"), 27, False),
        (T("5 + x = 90/5 = 18.", "18 - 5"), 21, False),
        (T("5x = 7.5 · 4.5 = 33.75.", "6.75"), 19, False),
        (T("5(5 + x) = 90.", "13 units"), 14, False),
        (T("AB · AD = AC · AE.", "13, by the secant theorem"), 18, False)]),
]
KL = {0: 0.0, 1: 3e-4, 2: 7e-4}  # a step's KL_i scale


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/geo3k-handwritten")
    out = Path(p.parse_args().out)
    rows, data = geo3k_rows(), out / "geometry3k-sample"
    out.mkdir(parents=True, exist_ok=True)
    write_hub_layout(data, {"train": rows, "test": rows[8:]})
    samples, metrics = [], []
    for step in sorted({g[0] for g in GROUPS}):
        at = [g for g in GROUPS if g[0] == step]
        texts = [text for g in at for text, _, _ in g[3]]
        golds = [rows[g[2]]["answer"] for g in at for _ in g[3]]
        B, G = len(at), len(at[0][3])
        accuracy = torch.tensor([reward.accuracy_reward(t, a) for t, a in zip(texts, golds)])
        fmt = torch.tensor([reward.format_reward(t) for t in texts])
        rewards, correct = (accuracy + fmt).view(B, G), (accuracy > 0).view(B, G)
        lengths = torch.tensor([n for g in at for _, n, _ in g[3]]).view(B, G)
        advantages0 = apo.grpo_advantages(rewards)
        stcr = apo.stcr_multiplier(correct, lengths, apo.Args.stcr_base)
        advantages = stcr * advantages0
        kappa = apo.dads_kl_weights(advantages, correct)
        kl = KL[step] * (0.5 + torch.rand(B, G, generator=torch.Generator().manual_seed(step)))
        for b, (_, chosen, row, responses) in enumerate(at):
            samples.append({"step": step, "chosen": chosen, "problem": rows[row]["problem"],
                            "answer": rows[row]["answer"], "row": row, "difficulty": apo.difficulty(correct)[b].item(),
                            "responses": [t for t, _, _ in responses], "format": fmt.view(B, G)[b].tolist(),
                            "truncated": [c for _, _, c in responses], "rewards": rewards[b].tolist(),
                            "advantages": advantages[b].tolist(), "lengths": lengths[b].tolist(),
                            "correct": correct[b].tolist(), "advantages0": advantages0[b].tolist(),
                            "stcr_multipliers": stcr[b].tolist(), "kl_weights": kappa[b].tolist(),
                            "kl": kl[b].tolist()})
        metrics.append({"step": step, "reward": rewards.mean().item(), "accuracy": accuracy.mean().item(),
                        "format_rate": (fmt > 0).float().mean().item(),
                        "response_length_correct": lengths[correct].float().mean().item(),
                        "response_length_wrong": lengths[~correct].float().mean().item(), "kl": kl.mean().item(),
                        "dads_weight_pos_mean": kappa[advantages > 0].mean().item(),
                        "stcr_mult_neg_mean": stcr[~correct].mean().item(),
                        "stcr_mult_neg_max": stcr[~correct].max().item()})
    args = dataclasses.asdict(apo.Args(model="hand-written responses", data=str(data), group_size=6,
                                       max_new_tokens=MAX_NEW_TOKENS, log_samples=1, log_random_samples=1))
    (out / "args.json").write_text(json.dumps(args, indent=1))
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    print(f"wrote {pictures.explain(out)}")


if __name__ == "__main__":
    main()
