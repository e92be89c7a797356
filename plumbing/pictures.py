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


# The curves, two figures of four panels each, readable at 800 px wide: what the run learned (curves.png), and the
# method's terms (curves_terms.png). Each panel: its title, then (log, key, label) drawn in it: log 'metrics' is per
# step, 'eval' per held-out evaluation.
CURVES = [
    ("reward", [("metrics", "reward", "")]),
    ("accuracy", [("metrics", "accuracy", "sampled"), ("eval", "accuracy", "held-out, greedy")]),
    ("format rate", [("metrics", "format_rate", "sampled"), ("eval", "format_rate", "held-out, greedy")]),
    ("response length (tokens)", [("metrics", "response_length_correct", "right"),
                                  ("metrics", "response_length_wrong", "wrong")]),
]
TERMS = [
    ("KL to the reference", [("metrics", "kl", "")]), ("entropy", [("metrics", "entropy", "")]),
    ("DADS: mean KL weight κ of positives", [("metrics", "dads_weight_pos_mean", "")]),
    ("STCR: multiplier 1 + w of negatives", [("metrics", "stcr_mult_neg_mean", "mean"),
                                              ("metrics", "stcr_mult_neg_max", "max")]),
]


def terms_path(path: Path) -> Path:
    """Where plot_curves draws the method's terms, beside `path`: curves.png -> curves_terms.png."""
    path = Path(path)
    return path.with_name(f"{path.stem}_terms{path.suffix}")


def chance_of(run: Path) -> float | None:
    """The accuracy of guessing on a run's data, where it is known: the toy's four colours, 1/4. None elsewhere
    (geometry3k's answers are free-form values)."""
    args = Path(run) / "args.json"
    data = json.loads(args.read_text()).get("data") if args.exists() else None
    if data in ("toy", "toy-graded"):
        from plumbing import toy
        return 1 / len(toy.COLOURS)
    return None


def _arm(arm) -> tuple:
    """(label, run folders): a run folder alone (labelled by its name), or (label, [run folders]), seeds of one arm."""
    if isinstance(arm, (str, Path)):
        return Path(arm).name, [Path(arm)]
    label, runs = arm
    return label, [Path(r) for r in runs]


def plot_curves(arms: list, path: Path, smooth: int = 10, chance: float | None = None) -> Path:
    """The curves of run folders: what they learned in `path` (reward, accuracy, format rate, response length) and
    the method's terms in terms_path(path) (KL, entropy, DADS's κ, STCR's 1 + w); returns `path`.

    Each arm is a run folder, or (label, [run folders]): seeds of one method, drawn in one colour, each seed thin
    and their mean bold; the arms' colours are named below the panels, each panel's kinds of curve in it. Per-step
    metrics (metrics.jsonl) are drawn smoothed (a moving average over `smooth` steps; a single run's raw values
    faint behind), held-out evaluations (eval.jsonl) as dots joined by dashes. A dotted line on the accuracy panel
    marks `chance`, by default the runs' own where known (chance_of: the toy's 1/4), else none. 8 inches wide at
    150 dpi, 11-point text: 11 px high at 800 px wide."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    arms = [_arm(a) for a in arms]
    if chance is None:
        chances = {chance_of(r) for _, runs in arms for r in runs}
        chance = chances.pop() if len(chances) == 1 else None  # several tasks: no one chance level
    logs = {r: {log: [json.loads(line) for line in (r / f"{log}.jsonl").read_text().splitlines() if line]
                if (r / f"{log}.jsonl").exists() else [] for log in ("metrics", "eval")}
            for _, runs in arms for r in runs}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    smoothed = lambda vs: [mean(vs[max(0, i - smooth + 1):i + 1]) for i in range(len(vs))]  # noqa: E731
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9
    key_line = lambda style, **kw: Line2D([], [], ls=style.strip("o"), marker="o" if "o" in style else None,  # noqa
                                          markersize=4, **kw)
    with plt.rc_context({"font.size": 11, "axes.titlesize": 12, "legend.fontsize": 9.5}):
        for panels, out in ((CURVES, Path(path)), (TERMS, terms_path(path))):
            fig, axes = plt.subplots(2, 2, figsize=(8, 5.8), layout="constrained")
            for ax, (title, curves) in zip(axes.flat, panels):
                kinds = {}  # the panel's kinds of curve and their styles: its legend (the arms are the figure's)
                for colour, (name, runs) in zip(colours, arms):
                    for (log, key, label), style in zip(curves, ("-", "--")):
                        series = [dict((r["step"], r[key]) for r in logs[run][log] if r.get(key) is not None)
                                  for run in runs]
                        steps = sorted(set.intersection(*(set(s) for s in series)))
                        if not steps:
                            continue
                        values = [mean([s[t] for s in series]) for t in steps]
                        if log == "eval":
                            kinds[label] = "o--"
                            for s in series if len(runs) > 1 else []:
                                ax.plot(sorted(s), [s[t] for t in sorted(s)], "--", color=colour, alpha=0.3, lw=0.8)
                            ax.plot(steps, values, "o--", color=colour, markersize=4)
                            continue
                        kinds[label] = style
                        for s in series:  # the raw values of one run, or each seed smoothed
                            t = sorted(s)
                            ax.plot(t, [s[i] for i in t] if len(runs) == 1 else smoothed([s[i] for i in t]), style,
                                    color=colour, alpha=0.2 if len(runs) == 1 else 0.35, lw=0.8)
                        ax.plot(steps, smoothed(values), style, color=colour, lw=1.8)
                ax.set_title(title)
                if not ax.lines:
                    ax.text(0.5, 0.5, "not logged", ha="center", va="center", color="0.5", transform=ax.transAxes)
                if title == "accuracy" and chance:
                    ax.axhline(chance, ls=":", color="0.35", lw=1.4)
                    kinds[f"chance ({chance:.3g})"] = ":"
                if len([k for k in kinds if k]) > 1:
                    ax.legend(handles=[key_line(style, color="0.35", label=k) for k, style in kinds.items() if k])
                ax.set_xlabel("step")
                ax.ticklabel_format(axis="y", useOffset=False)  # STCR's multipliers are 1.00001-ish: show them whole
                ax.grid(alpha=0.25)
            fig.legend(handles=[key_line("-", color=c, lw=2, label=name + (f" ({len(runs)} seeds)" if len(runs) > 1
                                                                           else ""))
                                for c, (name, runs) in zip(colours, arms)],
                       loc="outside lower center", ncol=min(len(arms), 4), frameon=False)
            save_figure(fig, out)
    return Path(path)


def save_figure(fig, path: Path, dpi: int = 150):
    """A matplotlib figure as a PNG at `dpi`, in 256 colours (lines and text need no more: a third of the bytes),
    then closed."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    image = Image.open(buffer).convert("RGB")
    image.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        path, format="PNG", optimize=True, dpi=(dpi, dpi))  # (octree: keeps a few pixels of red, unlike median cut)


# ------------------------------------------------------------------------------------------- a page of responses
PAGE_STYLE = """body{font:14px system-ui,sans-serif;margin:1em auto;max-width:1280px;color:#222;padding:0 8px}
[hidden]{display:none!important}
nav{position:sticky;top:0;z-index:1;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;display:flex;
flex-wrap:wrap;gap:.4em 1.2em;align-items:center}#count{color:#666}
.figures{display:flex;gap:.5em;margin:.5em 0}.figures img{flex:1;min-width:0;max-width:800px}
section.group{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.8em}
.head{display:flex;gap:1em}.head img{max-width:240px;max-height:240px;border:1px solid #eee}
.problem{white-space:pre-wrap}.facts{color:#555}code{background:#f4f4f4;padding:0 .2em;white-space:pre-wrap}
table{border-collapse:collapse;width:100%;margin-top:.5em}td,th{border-bottom:1px solid #e4e4e4;padding:.25em .4em;
vertical-align:top;text-align:right;white-space:nowrap}th{background:#fafafa}th.l{text-align:left}
td.read{text-align:left;white-space:normal;width:34%}td.why{text-align:left;white-space:normal;width:22%}
td:first-child,th:first-child{text-align:left}tr.right{background:#e8f6e8}tr.wrong{background:#fbeaea}
.nl{color:#999;font-size:11px}.cut{color:#b00;font-weight:600}
pre{white-space:pre-wrap;margin:.2em 0;font-size:12px}"""

# The filters: plain script, no network; without it the page shows everything.
PAGE_SCRIPT = """const $ = id => document.getElementById(id);
function filter() {
  const part = $('part').value, chosen = $('chosen') ? $('chosen').value : 'all', wrong = $('wrong').checked,
        cut = $('cut').checked, flags = [...document.querySelectorAll('input.flag:checked')].map(f => f.value);
  let groups = 0, rows = 0;
  for (const p of document.querySelectorAll('div.part')) {
    let shown = 0;
    for (const g of p.querySelectorAll('section.group')) {
      const on = (part === 'all' || p.id === part) && (chosen === 'all' || g.dataset.chosen === chosen) &&
                 flags.every(f => g.dataset[f] === '1');
      let n = 0;
      for (const r of g.querySelectorAll('tr.response')) {
        const v = on && (!wrong || r.classList.contains('wrong')) && (!cut || r.dataset.cut === '1');
        r.hidden = !v; n += v;
      }
      g.hidden = !n; shown += n > 0; rows += n;
    }
    p.hidden = !shown; groups += shown;
  }
  $('count').textContent = groups + ' groups, ' + rows + ' responses shown';
}
document.querySelectorAll('nav select, nav input').forEach(e => e.addEventListener('change', filter));
filter();"""

NOT_LOGGED = '<span class="nl">not logged</span>'


def _number(value, excess: bool = False) -> str:
    """A number to 3 significant digits (a count whole), or 'not logged'. `excess`: one plus a small part, written
    1 + 0.000612 (STCR's 1 + w: to 3 digits, 1.0006 would read 1)."""
    if value is None:
        return NOT_LOGGED
    if excess and value != 1:
        return f"1 {'+' if value > 1 else '−'} {abs(value - 1):.3g}"
    return str(int(value)) if isinstance(value, bool) or float(value).is_integer() and abs(value) < 1e6 else \
        f"{value:.3g}"


def _image_uri(image, size: int = 240) -> str:
    """A PIL image as an inline data: URI (PNG, at most `size` px a side): the page needs no other file."""
    import base64
    import io

    image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _reading(explained: dict | None, text: str, limit: int) -> str:
    """A response as the page shows it: its final answer, where it stood and how the grader read it, then the whole
    text (the thinking included) folded away, cut at `limit` characters; every character escaped, so that no
    response can break the page."""
    shown = text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"
    e, esc = explained or {}, html.escape
    if e.get("answer") is None:
        head = "no answer"
    else:
        head = f'answer <code>{esc(e["answer"])}</code> <span class="facts">({esc(e["source"] or "")})</span>'
        head += " → read as " + ("nothing" if e.get("reading") is None else f'<code>{esc(e["reading"])}</code>')
    return f"<div>{head}</div><details><summary>response</summary><pre>{esc(shown)}</pre></details>"


def _reasons(row: dict) -> str:
    """Why the response's 0s are 0s: cut at the token limit, then the grader's reasons; and a word where the grader
    today reads it otherwise than when it was logged."""
    e = row.get("explained") or {}
    reasons = (["cut at the token limit"] if row.get("cut") else []) + ([e["reason"]] if e.get("reason") else [])
    if row.get("right") is not None and e.get("accuracy") is not None and bool(e["accuracy"]) != row["right"]:
        reasons.append(f"the grader now reads it as {'right' if e['accuracy'] else 'wrong'} "
                       f"({'right' if row['right'] else 'wrong'} when graded): it has changed since")
    return html.escape("; ".join(reasons))


def render_page(path: Path, title: str, intro: str, figures: list, groups: list, columns: list, part_name: str,
                flags: tuple = ()) -> Path:
    """The one page builder, for a run's logged groups (`explain`) and an evaluation's answers (eval.py
    --explain RESULT.json): self-contained (images inline), every text escaped, with client-side filters.
    - intro: HTML; figures: PNG bytes, side by side;
    - groups: each a dict: part (its step or benchmark: the selector), chosen ('first', 'random' or None), image
      (HTML or None), problem, gold, facts (a line of HTML), flags ({name: bool}, for the filters of `flags`), limit
      (the characters shown of a response), rows: each {label, numbers ({column key: value, None where not
      logged}), right (True, False or None), cut (True, False or None), text (the response), explained
      (reward.explain's dict, or None)};
    - columns: (key, header, tooltip) of the numbers; part_name: what a part is ('step', 'benchmark');
    - flags: (name, label) of the group filters (groups with no signal, say)."""
    import base64

    esc = html.escape
    parts = list(dict.fromkeys(g["part"] for g in groups))
    ident = lambda part: f"{part_name}-{part}"  # noqa: E731
    chosen = sorted({g["chosen"] for g in groups if g.get("chosen")})
    nav = [f'<label>{part_name} <select id="part"><option value="all">all</option>' +
           "".join(f'<option value="{esc(ident(p))}">{esc(str(p))}</option>' for p in parts) + "</select></label>"]
    if len(chosen) > 1:
        nav.append('<label>groups <select id="chosen"><option value="all">all</option><option value="first">the '
                   "step's first</option><option value=\"random\">drawn at random</option></select></label>")
    nav += ['<label><input type="checkbox" id="wrong"> wrong only</label>',
            '<label><input type="checkbox" id="cut"> cut at the token limit only</label>']
    nav += [f'<label><input type="checkbox" class="flag" value="{esc(name)}"> {esc(label)}</label>'
            for name, label in flags]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
           f"<style>{PAGE_STYLE}</style></head><body><h1>{esc(title)}</h1>{intro}",
           "<nav>" + " ".join(nav) + ' <span id="count"></span></nav>']
    out += ['<div class="figures">' + "".join(f'<img alt="figure" src="data:image/png;base64,'
                                            f'{base64.b64encode(f).decode()}">' for f in figures) + "</div>"]
    header = "".join(f'<th title="{esc(tip)}">{esc(name)}</th>' for _, name, tip in columns)
    for part in parts:
        out.append(f'<div class="part" id="{esc(ident(part))}"><h2>{esc(part_name)} {esc(str(part))}</h2>')
        for g in (g for g in groups if g["part"] == part):
            rows = []
            for row in g["rows"]:
                colour = {True: "right", False: "wrong"}.get(row["right"], "unknown")
                cut = ' <span class="cut" title="cut at the token limit">✂</span>' if row.get("cut") else ""
                cells = "".join(f"<td>{_number(row['numbers'].get(key), name == '1 + w')}"
                                f"{cut if name == 'tokens' else ''}</td>" for key, name, _ in columns)
                rows.append(f'<tr class="response {colour}" data-cut="{int(bool(row.get("cut")))}">'
                            f'<td>{esc(str(row["label"]))}</td>{cells}'
                            f'<td class="read">{_reading(row.get("explained"), row["text"], g["limit"])}</td>'
                            f'<td class="why">{_reasons(row)}</td></tr>')
            first = next((r["explained"] for r in g["rows"] if r.get("explained")), None) or {}
            gold = f'gold <code>{esc(str(g["gold"]))}</code>'
            if first.get("gold_kind"):
                gold += f' → read as <code>{esc(first["gold_reading"])}</code> ({esc(first["gold_kind"])})'
            elif first:
                gold += " → not a usable gold"
            data = "".join(f' data-{esc(k)}="{int(bool(v))}"' for k, v in g.get("flags", {}).items())
            out.append(f'<section class="group" data-chosen="{esc(g.get("chosen") or "")}"{data}><div class="head">'
                       f'{g.get("image") or ""}<div><div class="problem">{esc(g["problem"])}</div>'
                       f'<p>{gold}</p><p class="facts">{g.get("facts", "")}</p></div></div><table><tr><th>#</th>'
                       f'{header}<th class="l">final answer, as the grader read it</th><th class="l">why a 0</th>'
                       f'</tr>{"".join(rows)}'
                       "</table></section>")
        out.append("</div>")
    Path(path).write_text("\n".join(out) + f"\n<script>{PAGE_SCRIPT}</script></body></html>\n")
    return Path(path)


RUN_COLUMNS = [("accuracy", "acc", "accuracy reward, 0 or 1"), ("format", "fmt", "format reward, 0 or 0.5"),
               ("rewards", "r", "reward r = acc + fmt"), ("advantages0", "Â⁰", "group advantage (r − mean) / std"),
               ("stcr_multipliers", "1 + w", "STCR's multiplier (wrong answers longer than the right ones)"),
               ("advantages", "Â", "advantage (1 + w)·Â⁰"), ("kl_weights", "κ", "DADS's KL weight (positives)"),
               ("kl", "KL", "the response's k3 KL to the reference, as the loss took it"),
               ("lengths", "tokens", "response length; ✂: cut at the token limit")]


def explain(run: Path, max_steps: int = 0, max_chars: int = 3000, max_bytes: int = 40_000_000) -> Path:
    """RUN/explain.html, a reward audit of a run folder: its curves, then each logged group (samples.jsonl) of every
    logged step (or `max_steps` of them, evenly spread, first and last included; fewer where the page would pass
    about `max_bytes`): its image, problem, gold as the grader reads it, difficulty and how it was chosen, and its G
    responses with accuracy, format, reward, Â⁰, 1 + w, Â, κ, KL and length (✂: cut at the token limit), the
    final answer as the grader reads it (reward.explain, today's grader) and why each 0 is a 0; at most
    `max_chars` characters of each response. Filters: wrong only, cut only, groups with no signal, a step, the
    first groups or those drawn at random. Fields that an earlier version did not log read 'not logged'."""
    import tempfile

    args = json.loads((run / "args.json").read_text())
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines() if line]
    logged = sorted({s["step"] for s in samples})
    steps = logged
    if 0 < max_steps < len(steps):  # evenly spread over the run
        steps = sorted({steps[round(i * (len(steps) - 1) / max(max_steps - 1, 1))] for i in range(max_steps)})
    size = {}  # a step's bytes on the page, about: its texts, ~900 bytes of markup a response, an image a group
    for s in samples:
        size[s["step"]] = size.get(s["step"], 0) + 30_000 + sum(min(len(t), max_chars) + 900 for t in s["responses"])
    while len(steps) > 2 and sum(size[t] for t in steps) > max_bytes:
        steps = sorted({steps[round(i * (len(steps) - 1) / (len(steps) * 9 // 10 - 1))]
                        for i in range(len(steps) * 9 // 10)})
    with tempfile.TemporaryDirectory() as tmp:
        figures = [f.read_bytes() for f in (plot_curves([run], Path(tmp) / "c.png"), terms_path(Path(tmp) / "c.png"))]
    try:  # the images come from the training data, by row
        table, base, columns = data.load_table(args["data"], args["split"], (args["image_column"],
                                                                           args["problem_column"],
                                                                           args["answer_column"]))
    except (SystemExit, ValueError, OSError) as err:  # moved, deleted, the Hub out of reach: a page without images
        table, why = None, f"the data is not at hand: {err.code if isinstance(err, SystemExit) else err}"
    groups = []
    for s in (s for s in samples if s["step"] in steps):
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
        per = lambda key, i: s[key][i] if key in s else None  # noqa: E731  (None: not logged by its version)
        rows = [{"label": i, "right": per("correct", i), "cut": per("truncated", i), "text": text,
                 "explained": reward.explain(text, s["answer"]),
                 "numbers": dict({k: per(k, i) for k, _, _ in RUN_COLUMNS},
                                 accuracy=None if "correct" not in s else float(s["correct"][i]))}
                for i, text in enumerate(s["responses"])]
        missing = [k for k in ("correct", "format", "truncated", "kl", "chosen") if k not in s]
        how = "drawn at random among the step's groups" if s.get("chosen") == "random" else \
            "one of the step's first"
        facts = f"difficulty d = {_number(s.get('difficulty'))}; {how}" + (
            f"; not logged by this run's version: {', '.join(missing)}" if missing else "")
        groups.append({"part": s["step"], "chosen": s.get("chosen", "first"), "image": image, "problem": s["problem"],
                       "gold": s["answer"], "facts": html.escape(facts), "rows": rows, "limit": max_chars,
                       "flags": {"flat": len(set(s["rewards"])) == 1 if "rewards" in s else False}})
    spread = "" if steps == logged else (f" ({len(steps)} of {len(logged)} logged steps, evenly spread: "
                                         "<code>--explain-steps</code>, and at most about "
                                         f"{max_bytes // 1_000_000} MB a page)")
    intro = (f"<p>{html.escape(args['model'])} on {html.escape(args['data'])}: {len(groups)} logged groups{spread}. "
             "Green: a right answer, red: a wrong one (as graded during the run). acc, fmt: the accuracy and format "
             "rewards, r = acc + fmt; Â⁰: the group advantage; 1 + w: STCR's multiplier (wrong answers longer than "
             "the right ones); Â = (1 + w)·Â⁰; κ: DADS's KL weight (positives of hard groups); KL: the "
             "response's KL to the reference; ✂: cut at the token limit. The final answers are read by today's "
             "grader (<code>reward.explain</code>). Numbers to 3 significant digits (1 + w: w's); a header's meaning "
             "on hover."
             "</p>")
    return render_page(run / "explain.html", str(run), intro, figures, groups, RUN_COLUMNS, "step",
                       flags=(("flat", "no signal only (all rewards equal)"),))
