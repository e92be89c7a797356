"""What a person looks at: the curves of run folders (curves.png, `eval.py --plot`), the live logs (--report-to
TensorBoard, W&B) and the page of a run's groups (`eval.py --explain`).
"""

import html
import json
import os
import sys
from pathlib import Path

import reward
from plumbing import data, parallel


def live_tag(log: str, key: str) -> str:
    """The TensorBoard and W&B name of a field of metrics.jsonl or eval.jsonl: eval/…, apo/… (DADS, STCR), train/…"""
    group = "eval" if log == "eval" else "apo" if key.startswith(("dads_", "stcr_")) else "train"
    return f"{group}/{key}"


class LiveLog:
    """--report-to: what `append` writes to metrics.jsonl, eval.jsonl and samples.jsonl is also sent, by process 0,
    to TensorBoard (out/tensorboard/) and W&B (out/wandb/), each imported only when asked for. The names are grouped
    as TRL groups its own: eval/… for held-out evaluations, apo/… for APO's terms (DADS, STCR), train/… for the rest
    of a step's metrics, each at the step of its JSON line; a step's samples as a text (TensorBoard) or a table (W&B).

    A resumed run goes on in the same TensorBoard folder and W&B run (its id in out/live.json), and redoes the steps
    after its checkpoint, which each backend keeps once:
    - TensorBoard: live.json holds the last step written to disk of each log, and the steps redone are not written
      again; their first values stay, which an exact resume reproduces (TensorBoard's purge_step hides scalars,
      not texts).
    - W&B: sent again at their steps; W&B ignores a step below a resumed run's last one (online, where the server
      tells the run where it stands), and so keeps the first values too, while a step it lost in a hard kill (its
      client writes its file every 15 s) is sent anew. Offline, W&B cannot know the run's steps: the resumed run's
      folder holds the steps it redid again."""

    def __init__(self, out: Path, report_to: str, config: dict):
        backends = {b.strip() for b in report_to.split(",")} - {"", "none"}
        if backends - {"tensorboard", "wandb"}:
            sys.exit(f"--report-to takes tensorboard, wandb, both (comma-separated) or none, not {report_to!r}")
        self.path, self.tensorboard, self.wandb = out / "live.json", None, None
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {"tensorboard_written": {}}
        if not parallel.is_main() or not backends:
            return
        try:
            if "tensorboard" in backends:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(out / "tensorboard"))
            if "wandb" in backends:
                import wandb
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "apo"), name=out.name, config=config,
                                        id=self.state.get("wandb_id"), resume="allow", dir=str(out))
                self.state["wandb_id"] = self.wandb.id  # a new run's, then the same on every resume
        except ImportError as e:
            sys.exit(f"--report-to {report_to} needs {e.name}: pip install {e.name}")
        self.path.write_text(json.dumps(self.state, indent=1))

    def log(self, name: str, rows: list):
        """Rows of one log ('metrics', 'eval' or 'samples'), step by step."""
        for step in sorted({r["step"] for r in rows}):
            at = [r for r in rows if r["step"] == step]
            # (a field that is None has no value this step: no correct response, say)
            scalars = {} if name == "samples" else {live_tag(name, k): v for k, v in at[0].items()
                                                    if k != "step" and isinstance(v, (int, float))}
            if self.wandb:
                self.wandb.log({"samples": samples_table(at, wandb=True)} if name == "samples" else scalars, step=step)
            written = self.state["tensorboard_written"]
            if self.tensorboard and step > written.get(name, -1):
                for tag, value in scalars.items():
                    self.tensorboard.add_scalar(tag, value, step)
                if name == "samples":
                    self.tensorboard.add_text("samples", samples_table(at), step)
                self.tensorboard.flush()  # on disk before live.json says so (a kill in between: this step twice)
                written[name] = step
                self.path.write_text(json.dumps(self.state, indent=1))

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


def samples_table(rows: list, wandb: bool = False):
    """A step's logged groups, one line per response (problem, gold, response, reward, advantage): a W&B Table, or
    a Markdown table for TensorBoard's text panel (whose cells may hold no | or line break)."""
    columns = ["problem", "answer", "response", "reward", "advantage"]
    lines = [[r["problem"], r["answer"], text, reward, advantage] for r in rows
             for text, reward, advantage in zip(r["responses"], r["rewards"], r["advantages"])]
    if wandb:
        import wandb as wb
        return wb.Table(columns=columns, data=lines)
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    table = [columns, ["---"] * len(columns)] + [list(map(cell, line)) for line in lines]
    return "\n".join(" | ".join(row) for row in table)


CURVES = [  # panel title, then (log, key, label) drawn in it: log 'metrics' is per step, 'eval' per evaluation
    ("reward", [("metrics", "reward", "")]),
    ("accuracy", [("metrics", "accuracy", "sampled"), ("eval", "accuracy", "held-out, greedy")]),
    ("format rate", [("metrics", "format_rate", "sampled"), ("eval", "format_rate", "held-out, greedy")]),
    ("response length (tokens)", [("metrics", "response_length_correct", "correct"),
                                  ("metrics", "response_length_wrong", "wrong")]),
    ("KL to the reference", [("metrics", "kl", "")]), ("entropy", [("metrics", "entropy", "")]),
    ("DADS: mean KL weight of positives", [("metrics", "dads_weight_pos_mean", "")]),
    ("STCR: advantage multiplier of negatives", [("metrics", "stcr_mult_neg_mean", "mean"),
                                                 ("metrics", "stcr_mult_neg_max", "max")]),
]


def plot_curves(run_dirs: list, path: Path, smooth: int = 10) -> Path:
    """The curves of one or more run folders in one PNG: per-step metrics (metrics.jsonl) raw and faint, with a
    moving average over `smooth` steps on top; held-out evaluations (eval.jsonl) as dots joined by dashes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for colour, run in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9, map(Path, run_dirs)):
        logs = {log: [json.loads(line) for line in (run / f"{log}.jsonl").read_text().splitlines() if line]
                if (run / f"{log}.jsonl").exists() else [] for log in ("metrics", "eval")}
        for ax, (title, curves) in zip(axes.flat, CURVES):
            for (log, key, label), style in zip(curves, ("-", "--")):
                points = [(r["step"], r[key]) for r in logs[log] if r.get(key) is not None]
                if not points:
                    continue
                steps, values = zip(*points)
                label = f"{run.name} {label}".strip()
                if log == "eval":
                    ax.plot(steps, values, "o--", color=colour, markersize=3, label=label)
                    continue
                window = [values[max(0, i - smooth + 1):i + 1] for i in range(len(values))]
                ax.plot(steps, values, style, color=colour, alpha=0.2, linewidth=0.8)
                ax.plot(steps, [sum(w) / len(w) for w in window], style, color=colour, label=label)
            ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize=7)
        ax.ticklabel_format(axis="y", useOffset=False)  # STCR's multipliers are 1.00001-ish: show them whole
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60, pil_kwargs={"optimize": True})
    plt.close(fig)
    return Path(path)


# -------------------------------------------------------------------------------------------- a run, explained
PAGE_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
nav{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #ddd}
section.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.8em;display:grid;
grid-template-columns:240px 1fr;gap:1em}
.group img{max-width:240px;border:1px solid #eee}.problem{white-space:pre-wrap}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #eee;padding:.25em .4em;
vertical-align:top;text-align:right;white-space:nowrap}td.text{text-align:left;width:60%;white-space:normal}
tr.right{background:#e8f6e8}tr.wrong{background:#fbeaea}
pre{white-space:pre-wrap;margin:.2em 0;font-size:12px}.answer{font-weight:600}"""


def _image_uri(image, size: int = 240) -> str:
    """A PIL image as an inline data: URI (PNG, at most `size` px a side): the page needs no other file."""
    import base64
    import io

    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _response_cells(text: str, limit: int) -> str:
    """A response as the page shows it: its answer, then the whole text (the thinking included) folded away,
    cut at `limit` characters; every character escaped, so that no response can break the page."""
    answer = reward.extract_answer(text)
    shown = text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"
    head = f'<div class="answer">answer: {html.escape(answer)}</div>' if answer else "<div>no answer</div>"
    return f"{head}<details><summary>response</summary><pre>{html.escape(shown)}</pre></details>"


def explain(run: Path, max_steps: int = 30, max_chars: int = 3000) -> Path:
    """RUN/explain.html: the curves of a run folder, then each logged group of (at most `max_steps`, evenly
    spread, first and last included) logged steps: its image, problem, gold and difficulty, and its G responses
    with reward, Â⁰, 1 + w, Â, κ and length, green when right, red when wrong. Self-contained (images inline,
    one line of script for the step selector, which also works as plain links)."""
    import base64
    import tempfile

    args = json.loads((run / "args.json").read_text())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    steps = sorted({s["step"] for s in samples})
    if len(steps) > max_steps:  # evenly spread over the run
        steps = sorted({steps[round(i * (len(steps) - 1) / (max_steps - 1))] for i in range(max_steps)})
    with tempfile.TemporaryDirectory() as tmp:
        curves = base64.b64encode(plot_curves([run], Path(tmp) / "c.png").read_bytes()).decode()
    try:  # the images come from the training data, by row
        table, base, columns = data.load_table(args["data"], args["split"], (args["image_column"],
                                                                           args["problem_column"],
                                                                           args["answer_column"]))
    except (SystemExit, ValueError, OSError) as err:  # moved, deleted, the Hub out of reach: a page without images
        table, why = None, f"the data is not at hand: {err.code if isinstance(err, SystemExit) else err}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.name)}</title>"
             f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(str(run))}</h1>",
             f"<p>{html.escape(args['model'])} on {html.escape(args['data'])}: {len(steps)} of the logged steps "
             f"shown (<code>--explain-steps</code>). Green: a right answer, red: a wrong one. Â⁰: the group "
             f"advantage; 1 + w: STCR's multiplier (wrong answers longer than the right ones); Â = (1 + w)·Â⁰; κ: "
             f"DADS's KL weight (positives of hard groups).</p>",
             "<nav>step <select onchange=\"location.hash=this.value\">" +
             "".join(f'<option value="step-{t}">{t}</option>' for t in steps) + "</select> " +
             " ".join(f'<a href="#step-{t}">{t}</a>' for t in steps) + "</nav>",
             f'<img alt="curves" src="data:image/png;base64,{curves}" style="max-width:100%">']
    for t in steps:
        parts.append(f'<h2 id="step-{t}">step {t}</h2>')
        for s in (s for s in samples if s["step"] == t):
            if table is None:
                image = f"<p>no image ({html.escape(why)})</p>"
            elif s.get("row") is None:
                image = "<p>no image (samples.jsonl names no data row: a run of an earlier version)</p>"
            else:
                try:
                    example = data.prepare_example(table[s["row"]], columns, base)
                    image = f'<img alt="image" src="{_image_uri(example["images"][0])}">'
                except (IndexError, data.BadRow, OSError) as err:
                    image = f"<p>no image ({html.escape(str(err))})</p>"
            rows = []
            for i, text in enumerate(s["responses"]):
                numbers = [s[k][i] if k in s else None for k in ("rewards", "advantages0", "stcr_multipliers",
                                                                  "advantages", "kl_weights", "lengths")]
                cells = "".join("<td>-</td>" if v is None else f"<td>{v:.6g}</td>" for v in numbers)
                right = s["correct"][i] if "correct" in s else None  # (not logged by earlier versions)
                colour = {True: "right", False: "wrong", None: "unknown"}[right]
                rows.append(f'<tr class="{colour}"><td>{i}</td>{cells}'
                            f'<td class="text">{_response_cells(text, max_chars)}</td></tr>')
            parts.append(f'<section class="group"><div>{image}</div><div><div class="problem">'
                         f'{html.escape(s["problem"])}</div><p>gold: <b>{html.escape(str(s["answer"]))}</b>, '
                         f'difficulty d = {s.get("difficulty", float("nan")):.3f}</p><table><tr><th>#</th>'
                         "<th>reward</th><th>Â⁰</th><th>1 + w</th><th>Â</th><th>κ</th><th>tokens</th>"
                         f'<th>response</th></tr>{"".join(rows)}</table></div></section>')
    path = run / "explain.html"
    path.write_text("\n".join(parts) + "\n</body></html>\n")
    return path
