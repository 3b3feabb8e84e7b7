"""python -m dpbp.report RUN_DIR [RUN_DIR ...]: plots and a Markdown report of finished (or running) runs.

One run  -> RUN_DIR/report.png and RUN_DIR/report.md.
Several  -> compare.png and compare.md in the first RUN_DIR, every run overlaid (1 vs 4 ranks, fast vs
            reproducible ...). --out DIR puts the files in DIR instead.

The figure: training and held-out loss against step; held-out accuracy against step; time per step
split into the gradient Allreduce and everything else (forward, backward, update, and the evaluations
and checkpoints of the interval). Reads config.toml, metrics.jsonl and header.jsonl; needs matplotlib
(pip install 'dpbp[report]'), drawn with the Agg backend, so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

from dpbp import cli
from dpbp.cli import ArgumentParser, parse_args
from dpbp.config import OPTIONS, load_config, _toml_value
from dpbp.errors import UserError
from dpbp.progress import comm_share


@dataclass
class Run:
    path: str
    cfg: dict
    train: list  # train records of metrics.jsonl, one per step (the newest wins after a resume), by step
    val: list  # "split": "val" records, likewise
    headers: list = field(default_factory=list)  # header.jsonl: one per start of the run
    skipped: int = 0  # unreadable metrics lines (a job killed mid-write)

    @property
    def label(self):
        name = os.path.basename(os.path.normpath(self.path))
        h = self.headers[-1] if self.headers else None
        if not h:
            return name
        return f"{name} ({h['world_size']} rank{'s' if h['world_size'] != 1 else ''}, {h['reduce']})"


# ---------------------------------------------------------------- reading a run


def load_run(path):
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isdir(path):
        raise UserError(f"{path!r} is not a directory (expected a run directory made by dpbp.train)")
    if not os.path.exists(metrics):
        raise UserError(f"{path!r} has no metrics.jsonl; is it a run directory made by dpbp.train?")
    cfg_path = os.path.join(path, "config.toml")
    cfg = load_config(cfg_path if os.path.exists(cfg_path) else None)
    records, skipped = read_jsonl(metrics)
    train, val = {}, {}
    for rec in records:
        if not isinstance(rec, dict) or "step" not in rec or "loss" not in rec:
            skipped += 1
            continue
        # A requeued run repeats the steps after its last checkpoint: keep the newest figures.
        (val if rec.get("split") == "val" else train)[rec["step"]] = rec
    if not train and not val:
        raise UserError(f"{metrics}: no records yet (the run has not logged a step)")
    headers, _ = read_jsonl(os.path.join(path, "header.jsonl"))
    return Run(path, cfg, [train[k] for k in sorted(train)], [val[k] for k in sorted(val)], headers, skipped)


def read_jsonl(path):
    """(records, number of unreadable lines); a missing file reads as empty."""
    if not os.path.exists(path):
        return [], 0
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    bad += 1
    return records, bad


# ---------------------------------------------------------------- figures derived from the records


def step_times(rec):
    """(seconds per step outside the Allreduce, seconds per step in it) over the record's interval.

    step_s and comm_s cover the interval since the previous record and samples_per_s its throughput,
    so a step of B samples took B / samples_per_s seconds, comm_s / step_s of it in the Allreduce.
    """
    per_step = rec["batch"] / rec["samples_per_s"] if rec.get("samples_per_s") else math.nan
    share = comm_share(rec)
    return per_step * (1 - share), per_step * share


def summary(run):
    """The report's table rows for one run: {row name: text}."""
    rows = {}
    h = run.headers[-1] if run.headers else {}
    last = run.train[-1] if run.train else None
    rows["ranks (world size)"] = str(h.get("world_size", "?"))
    rows["reduce"] = run.cfg["comm.reduce"]
    rows["model"] = "-".join(map(str, run.cfg["model.sizes"])) + f" {run.cfg['model.activation']}"
    rows["global batch"] = str(run.cfg["data.batch_size"])
    steps = max([r["step"] for r in run.train + run.val])
    rows["steps"] = str(steps)
    seconds = sum(r.get("step_s", 0.0) for r in run.train)
    samples = sum(r["samples_per_s"] * r["step_s"] for r in run.train if r.get("step_s"))
    comm = sum(r.get("comm_s", 0.0) for r in run.train)
    rows["training time (s)"] = f"{seconds:.2f}"
    rows["samples/s"] = f"{samples / seconds:.0f}" if seconds > 0 else "-"
    rows["Allreduce share of step time"] = f"{100 * comm / seconds:.1f}%" if seconds > 0 else "-"
    rows["final training loss"] = f"{last['loss']:.6g}" if last else "-"
    if last and "accuracy" in last:
        rows["final training accuracy"] = f"{last['accuracy']:.4f}"
    if run.val:
        rows["final held-out loss"] = f"{run.val[-1]['loss']:.6g}"
        if "accuracy" in run.val[-1]:
            best = max(run.val, key=lambda r: r["accuracy"])
            rows["final held-out accuracy"] = f"{run.val[-1]['accuracy']:.4f}"
            rows["best held-out accuracy"] = f"{best['accuracy']:.4f} (step {best['step']})"
    return rows


# ---------------------------------------------------------------- the figure


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), or one clear message."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("dpbp.report draws with matplotlib, which is not installed: "
                        "pip install 'dpbp[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(runs, png):
    plt = pyplot()
    fig, (ax_loss, ax_acc, ax_time) = plt.subplots(1, 3, figsize=(15, 4.4))
    for i, run in enumerate(runs):
        color = f"C{i}"
        batch = run.cfg["data.batch_size"]
        if run.train:
            ax_loss.plot([r["step"] for r in run.train], [r["loss"] for r in run.train], color=color,
                         label=f"{run.label} training")
        if run.val:
            ax_loss.plot([r["step"] for r in run.val], [r["loss"] for r in run.val], color=color, ls="--",
                         marker=".", label=f"{run.label} held out")
        acc = [r for r in run.val if "accuracy" in r]
        if acc:
            ax_acc.plot([r["step"] for r in acc], [r["accuracy"] for r in acc], color=color, marker=".",
                        label=run.label)
        timed = [r for r in run.train if r.get("step_s")]
        if timed:
            # A record covers the steps since the previous one: draw it over that interval (the
            # first starts log_every steps earlier).
            x = [max(0, timed[0]["step"] - run.cfg["train.log_every"])] + [r["step"] for r in timed]
            compute, comm = zip(*(step_times({**r, "batch": batch}) for r in timed))
            compute, comm = compute[:1] + compute, comm[:1] + comm
            total = [1e3 * (a + b) for a, b in zip(compute, comm)]
            comm_ms = [1e3 * b for b in comm]
            if len(runs) == 1:
                ax_time.fill_between(x, 0, comm_ms, color="C1", alpha=0.6, step="pre", label="Allreduce")
                ax_time.fill_between(x, comm_ms, total, color="C0", alpha=0.6, step="pre",
                                     label="compute and the rest")
            else:
                ax_time.step(x, total, color=color, label=f"{run.label} total")
                ax_time.step(x, comm_ms, color=color, ls=":", label=f"{run.label} Allreduce")
    losses = [r["loss"] for run in runs for r in run.train + run.val]
    if min(losses) > 0 and max(losses) > 20 * min(losses):  # a log scale only where it shows more
        ax_loss.set_yscale("log")
    ax_loss.set(title="loss", xlabel="step", ylabel="E (per loss.reduction, + L2 term)")
    ax_acc.set(title="held-out accuracy", xlabel="step", ylabel="accuracy")
    if not any("accuracy" in r for run in runs for r in run.val):
        ax_acc.text(0.5, 0.5, "no held-out accuracy\n(no validation split or no class labels)",
                    ha="center", va="center", transform=ax_acc.transAxes)
    ax_time.set(title="time per step", xlabel="step", ylabel="ms per step (mean over the interval)")
    for ax in (ax_loss, ax_acc, ax_time):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the Markdown


def markdown(runs, png_name):
    title = runs[0].path if len(runs) == 1 else ", ".join(r.path for r in runs)
    lines = [f"# dpbp report: {title}", "", f"![loss, held-out accuracy and time per step]({png_name})", "",
             "## Summary", ""]
    tables = [summary(r) for r in runs]
    names = list(dict.fromkeys(k for t in tables for k in t))
    lines += ["| | " + " | ".join(f"`{r.path}`" for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(t.get(k, "-") for t in tables) + " |" for k in names]
    lines += ["", "## Config", "", "Keys that differ from the defaults "
              "(`python -m dpbp.config --markdown` lists them all):", ""]
    changed = [k for k in OPTIONS if any(r.cfg[k] != OPTIONS[k].default for r in runs)]
    lines += ["| key | default | " + " | ".join(f"`{r.path}`" for r in runs) + " |", "|---" * (len(runs) + 2) + "|"]
    lines += [f"| `{k}` | `{_toml_value(OPTIONS[k].default)}` | " + " | ".join(
        f"`{_toml_value(r.cfg[k])}`" for r in runs) + " |" for k in changed]
    for run in runs:
        if run.headers:
            h = run.headers[-1]
            lines += ["", f"`{run.path}` ran with dpbp {h.get('dpbp')}, {h.get('mpi')}, {h.get('blas')}"
                      + (f"; started {len(run.headers)} times (resumed)" if len(run.headers) > 1 else "") + "."]
        if run.skipped:
            lines += ["", f"`{run.path}`: {run.skipped} unreadable line(s) in metrics.jsonl were skipped."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def build_parser():
    p = ArgumentParser(prog="python -m dpbp.report",
                       description="Plot and summarise runs: RUN_DIR/report.png and report.md for one run; "
                                   "compare.png and compare.md (in the first RUN_DIR) overlaying several.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories made by dpbp.train")
    p.add_argument("--out", help="directory for the files (default: the first RUN_DIR)")
    return p


def main(argv, comm):
    args = parse_args(build_parser(), argv, comm)
    if comm.rank != 0:  # a report is one process's job; other ranks (if any) have nothing to do
        return 0
    pyplot()  # fail early, before reading anything, if matplotlib is missing
    runs = [load_run(p) for p in args.runs]
    out = args.out or args.runs[0]
    os.makedirs(out, exist_ok=True)
    stem = "report" if len(runs) == 1 else "compare"
    png, md = os.path.join(out, f"{stem}.png"), os.path.join(out, f"{stem}.md")
    plot(runs, png)
    with open(md, "w") as f:
        f.write(markdown(runs, f"{stem}.png"))
    for run in runs:
        if run.skipped:
            print(f"dpbp.report: warning: {run.path}: skipped {run.skipped} unreadable metrics line(s)",
                  file=sys.stderr)
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main, prog="dpbp.report"))
