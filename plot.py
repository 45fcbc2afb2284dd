"""Figures and results.md from run directories: reads only config.json and metrics.jsonl.

    python plot.py RESULTS_DIR [--target LOSS] [--readme README.md]
    python plot.py RUN_DIR [RUN_DIR ...] [--target LOSS] [--out PNG]   (any runs, side by side)
    python plot.py --pick WHAT ARGS...        (run.sh's choices: best, next-lr, next-damping, lr, ...)

RESULTS_DIR holds the layout that `run.sh quick|full` (and `run.sh seeds`) writes:
  sweep/<method>_<lr>/       lr sweeps                                          -> sweeps.png
  fig1/<method>/             every method from the shared start at K micro-batches -> Figure 1
  fig2/<method>_b<b>/        a fixed micro-batch budget at b < K per step       -> Figures 2, 3
  seeds/seed<s>/<method>/    Figure 1 again for seeds s = 1, 2                  -> error bars
  ablations/<name>/          GN variants                                        -> ablations.png
  oracle/                    oracle.py's tables (quoted in results.md when present)
It writes the figures and RESULTS_DIR/results.md.
The target loss is RESULTS_DIR/target.txt (unrounded) unless --target is given. Steps to the
target are counted two ways: `first` is the first evaluated step at or below it, `interp`
interpolates the validation loss linearly between that evaluation and the one before (so a run
that misses the target by 4e-5 at step 16 counts 16.0 instead of 17). Ratios use `interp`.
Every number that results.md and the README's results section print comes from these files.
"""
import argparse
import glob
import json
import math
import os
import re
import sys

if __name__ != "__main__" or sys.argv[1:2] != ["--pick"]:   # (run.sh's many --pick calls read
    import matplotlib                                        # logs only: 0.2 s each without it, 1 s with)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

# The paper's steps to validation loss 3.25 (its Figure 1): GN 54, layerwise 78, SOAP 292,
# Muon ~864 (40M-token batch), AdamW slower (no number).
PAPER = {"gn_full": "54", "gn_layerwise": "78", "soap": "292", "muon": "~864", "adamw": "more"}
BASELINES = ("adamw", "muon", "soap")
NAMES = {"adamw": "AdamW", "muon": "Muon", "soap": "SOAP", "gn_full": "GN full (Algorithm 1)",
         "gn_layerwise": "GN layerwise", "gn_proxlinear": "GN prox-linear (line search)",
         "gn_proxlinear_no_ls": "GN prox-linear (no line search)", "kfac": "K-FAC"}
COLORS = {"adamw": "tab:gray", "muon": "tab:orange", "soap": "tab:green", "gn_full": "tab:blue",
          "gn_layerwise": "tab:purple", "gn_proxlinear": "tab:red", "gn_proxlinear_no_ls": "tab:pink",
          "kfac": "tab:brown"}
PREAMBLE = ("# Results\n\nWritten by `python plot.py` from the config.json and metrics.jsonl files "
            "beside this file; run.sh states the plan.\n\n")
def display(m):
    """A run or sweep's name as printed: K-FAC's sweeps are one per damping (kfac_lam<lam>)."""
    return f"K-FAC (lam {m[len('kfac_lam'):]})" if m.startswith("kfac_lam") else NAMES.get(m, m)


README_BEGIN, README_END = "<!-- results:begin (plot.py --readme) -->", "<!-- results:end -->"


# ---------------------------------------------------------------- reading the logs
def plan_budget(run_dir):
    """A Figure-1 row's budget (fig1/NAME or seeds/seed*/NAME of a plan): the steps its plan's
    sweep of NAME ran to; None for any other run. Its plan may have run it on past the budget
    (run.sh's LONG, for r(k)); the one rule sees it only up to the budget."""
    path = os.path.realpath(run_dir)
    name, parent = os.path.basename(path), os.path.dirname(path)
    if os.path.basename(parent) == "fig1":
        root = os.path.dirname(parent)
    elif os.path.basename(os.path.dirname(parent)) == "seeds":
        root = os.path.dirname(os.path.dirname(parent))
    else:
        return None
    sweep = os.path.join(root, "sweep", "kfac_lam*" if name == "kfac" else f"{name}_[0-9]*", "config.json")
    last = lambda c: ([c["args"]["steps"]] + [r["changed"]["steps"] for r in c.get("resumes", [])
                                              if "steps" in r["changed"]])[-1]   # as last given (a resume's)
    return max((last(json.load(open(p))) for p in glob.glob(sweep)), default=None)


def load(run_dir, whole=False):
    """A run's config and logs; "val" its evaluations (step, tokens, seconds, loss) up to its
    plan's budget (plan_budget; every one if whole), "val_all" every one."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    conf = json.load(open(os.path.join(run_dir, "config.json")))
    a = conf["args"]
    val = [(r["step"], r["tokens"], r.get("elapsed", 0.0), r["val_loss"]) for r in rows if "val_loss" in r]
    budget = None if whole else plan_budget(run_dir)
    return {"name": os.path.basename(run_dir.rstrip("/")), "dir": run_dir, "conf": conf, "rows": rows,
            "lr": a.get("lr"), "K": a.get("grad_accum") or a.get("inner_steps") or a.get("outer_batches"),
            "val": [p for p in val if budget is None or p[0] <= budget], "val_all": val}


def runs(pattern):
    return [load(os.path.dirname(p)) for p in sorted(glob.glob(os.path.join(pattern, "metrics.jsonl")))]


def to_target(run, target):
    """None if no evaluation reached `target`, else {first, interp}: each (step, tokens, seconds),
    `first` at the first evaluation with val_loss <= target, `interp` linear in val_loss between
    that evaluation and the previous one."""
    prev = None
    for point in run["val"]:
        if point[3] <= target:
            if prev is None or prev[3] == point[3]:
                return {"first": point[:3], "interp": point[:3]}
            w = (prev[3] - target) / (prev[3] - point[3])
            return {"first": point[:3], "interp": tuple(p + w * (q - p) for p, q in zip(prev[:3], point[:3]))}
        prev = point
    return None


ALONE_SHARE = 0.1   # of one core: what other processes may take over a run's steps for it to count as alone


def alone(run):
    """Whether the run had the machine to itself: its metrics rows record the CPU seconds other
    processes took during each step (other_cpu_s, data.cpu_seconds), and over all its steps they
    took at most ALONE_SHARE of one core; None where the rows do not record it (the logs made
    before they did: aloneness unknown). Seconds are compared only between runs made alone."""
    rows = [r for r in run["rows"] if "other_cpu_s" in r]
    if not rows:
        return None
    return sum(r["other_cpu_s"] for r in rows) <= ALONE_SHARE * sum(r["step_time"] for r in rows)


def steps_to(run, target):
    """A run's interpolated steps to the target, or None if it never reaches it."""
    hit = to_target(run, target)
    return hit["interp"][0] if hit else None


def first_step(hit):
    """Whether a run's first step already reaches the target (hit: to_target's answer): its
    steps to it are then a fraction of one step, bounded by the step, not measured."""
    return bool(hit) and hit["first"][0] == 1


def final(run):
    return run["val"][-1]


def target_of(results, override=None):
    if override is not None:
        return override
    path = os.path.join(results, "target.txt")
    if not os.path.exists(path):
        print(f"error: no --target and no {path}; pass --target LOSS", file=sys.stderr)
        sys.exit(2)
    return float(open(path).read().split()[0])


def rank_key(run, target):
    """The one rule that ranks every sweep, baselines and GN alike: fewest interpolated steps to
    the target, then (runs that miss it) the lowest final validation loss."""
    hit = to_target(run, target)
    return (hit["interp"][0] if hit else math.inf, final(run)[3])


def flag(argv, name, default=None):
    """The value after `name` in a command's argv (the last one given), or default."""
    at = [i for i, x in enumerate(argv[:-1]) if x == name]
    return argv[at[-1] + 1] if at else default


# ---------------------------------------------------------------- run.sh's choices
def pick(what, args):
    if what in ("lr", "damping"):                       # lr DIR, damping DIR (K-FAC's lam)
        return repr(load(args[0])["conf"]["args"][what])
    if what == "final":                                 # final DIR: its last validation loss
        return repr(final(load(args[0], whole=True))[3])
    if what == "target":                                # target STEP DIR...: lowest val at STEP
        step = int(args[0])
        return repr(min(v for d in args[1:] for s, _, _, v in load(d)["val"] if s == step))
    if what == "made-with":                             # made-with DIR SCRIPT ARGS...: yes, longer, no
        if not os.path.exists(os.path.join(args[0], "metrics.jsonl")):    # (whether a finished run is
            return "yes"                                # what ARGS ask; oracle.py's tables: done)
        r, argv = load(args[0], whole=True), args[2:]
        a = r["conf"]["args"]
        if any(flag(argv, f"--{k}") is not None and float(flag(argv, f"--{k}")) != a.get(k)
               for k in ("lr", "damping")):
            return "no"                                 # another lr or lam: made again
        steps, target = flag(argv, "--steps"), float(flag(argv, "--target-loss", 0))
        if (target and to_target(r, target)) or steps is None or final(r)[0] >= int(steps):
            return "yes"
        return "longer"                                 # the same run, resumed to the new budget
    if args[:1] != ["--target"]:
        raise SystemExit(f"error: --pick {what} ranks by steps to a target: give --target T first")
    target, rs = float(args[1]), [load(d) for d in args[2:]]
    if what == "best":                                  # best --target T DIR...: its directory
        return min(rs, key=lambda r: rank_key(r, target))["dir"]
    if what in ("next-lr", "next-damping"):             # next-lr|next-damping --target T DIR...:
        key, by = ("lr", 3) if what == "next-lr" else ("damping", 10)     # grid extension, x3 or x10
        grid = sorted({r["conf"]["args"][key] for r in rs})
        best = min(rs, key=lambda r: rank_key(r, target))["conf"]["args"][key]
        if len(grid) < 3 or grid[0] < best < grid[-1]:
            return ""
        return f"{best / by if best == grid[0] else best * by:.3g}".replace("e-0", "e-")
    raise SystemExit(f"error: unknown --pick {what}")


# ---------------------------------------------------------------- figures
def curve(ax, run, x, color=None, label=None, **kw):
    i = {"step": 0, "tokens": 1, "time": 2}[x]
    ax.plot([p[i] for p in run["val_all"]], [p[3] for p in run["val_all"]], "-o", ms=3,
            label=label or run["name"], color=color or COLORS.get(run["name"]), **kw)


def style(ax, title, xlabel, ylabel="validation loss"):
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save(fig, results, name):
    fig.tight_layout()
    fig.savefig(os.path.join(results, name), dpi=110)
    plt.close(fig)


def seed_runs(results):
    """{method: [run of seed 0 (fig1), seed 1, ...]} for the methods that have seed runs."""
    out = {}
    for d in sorted(glob.glob(os.path.join(results, "seeds", "seed*", "*", "metrics.jsonl"))):
        r = load(os.path.dirname(d))
        out.setdefault(r["name"], []).append(r)
    fig1 = {r["name"]: r for r in runs(os.path.join(results, "fig1", "*"))}
    return {m: [fig1[m]] + rs for m, rs in out.items() if m in fig1}


def seed_stats(seeds, target):
    """Per method: interpolated steps to target per seed (None: not reached); per seed, the
    ratio best-baseline steps / GN steps."""
    steps = {m: [steps_to(r, target) for r in rs]
             for m, rs in seeds.items()}
    ratios = []
    if "gn_full" in steps:
        for i, g in enumerate(steps["gn_full"]):
            base = [steps[m][i] for m in BASELINES if m in steps and i < len(steps[m]) and steps[m][i]]
            ratios.append(min(base) / g if base and g else None)
    return steps, ratios


def figure1(results, rs, target, seeds):
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    for ax, x, xl in zip(axes, ("step", "tokens", "time"),
                         ("optimizer / outer steps", "tokens (incl. line search)", "seconds in steps (compilation apart)")):
        for r in rs:
            curve(ax, r, x)
        ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:.4f}")
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    steps, _ = seed_stats(seeds, target)
    for i, (m, ss) in enumerate(sorted(steps.items())):
        got = [s for s in ss if s is not None]
        if got:
            mean = sum(got) / len(got)
            ax.bar(i, mean, color=COLORS.get(m), alpha=0.6,
                   yerr=[[mean - min(got)], [max(got) - mean]], capsize=5)
            ax.plot([i] * len(got), got, "ko", ms=4)
        if len(got) < len(ss):
            ax.annotate(f"{len(ss) - len(got)} not reached", (i, 0), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(steps)), [NAMES.get(m, m).split(" (")[0] for m in sorted(steps)], fontsize=8)
    ax.set_ylabel("steps to target (interpolated)")
    ax.set_title(f"over {max((len(s) for s in steps.values()), default=0)} seeds: mean, range, each seed")
    ax.grid(alpha=0.3, axis="y")
    K = rs[0]["K"] if rs else "?"
    fig.suptitle(f"Figure 1: from the shared AdamW start, {K} micro-batches per step for every method")
    save(fig, results, "fig1_iterations.png")


def sweeps(results):
    by = {}
    for r in runs(os.path.join(results, "sweep", "*")):
        by.setdefault(r["name"].rsplit("_", 1)[0], []).append(r)
    if not by:
        return by
    fig, axes = plt.subplots(1, len(by), figsize=(4.5 * len(by), 4), squeeze=False)
    for ax, (m, rs) in zip(axes[0], sorted(by.items())):
        for i, r in enumerate(sorted(rs, key=lambda r: r["lr"])):
            curve(ax, r, "step", color=plt.cm.viridis(i / max(len(rs) - 1, 1)), label=f"lr {r['lr']:g}")
        style(ax, f"{display(m)} sweep", "step")
    save(fig, results, "sweeps.png")
    return by


def figures23(results, fig1):
    """Final loss at a fixed budget of micro-batches, and steps to a loss, per batch size. The
    point at Figure 1's K is the Figure-1 run cut at the same budget."""
    by = {}
    budget = None
    for r in runs(os.path.join(results, "fig2", "*")):
        m = re.match(r"(.+)_b(\d+)$", r["name"])
        if m:
            budget = r["conf"]["args"]["steps"] * r["K"]
            by.setdefault(m.group(1), []).append((r["K"], r))
    if not by:
        return by, None, None
    for r in fig1:
        if r["name"] in by and budget % r["K"] == 0 and r["K"] not in [b for b, _ in by[r["name"]]]:
            cut = dict(r, val=[p for p in r["val"] if p[0] <= budget // r["K"]])
            if cut["val"][-1][0] == budget // r["K"]:
                by[r["name"]].append((r["K"], cut))
    # Figure 3's loss: AdamW's own final loss at its middle batch size (reached by most runs)
    ref = sorted(by.get("adamw", next(iter(by.values()))), key=lambda p: p[0])
    target3 = final(ref[len(ref) // 2][1])[3]
    fig, (a2, a3) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, pts in sorted(by.items()):
        pts.sort(key=lambda p: p[0])
        tok = lambda r: r["K"] * r["conf"]["tokens_per_micro_batch"]
        c = COLORS.get(method)
        a2.plot([tok(r) for _, r in pts], [final(r)[3] for _, r in pts], "-o", label=method, color=c)
        hit = [(tok(r), to_target(r, target3)) for _, r in pts]
        xs = [t for t, h in hit if h]
        a3.plot(xs, [h["interp"][0] for _, h in hit if h], "-o", label=method, color=c)
        miss = [t for t, h in hit if not h]          # reached never: hollow marker at the top
        if miss:
            top = max([final(r)[0] for _, r in pts])
            a3.plot(miss, [top] * len(miss), "o", mfc="none", color=c, ms=9,
                    label=f"{method}: not reached in its budget")
    a2.set_title(f"Figure 2: final validation loss at {budget} micro-batches")
    a3.set_title(f"Figure 3: steps to validation loss {target3:.4f}\n(AdamW's Figure-2 loss at its middle batch)")
    for ax, yl in ((a2, "final validation loss"), (a3, "steps to the loss (interpolated)")):
        ax.set_xscale("log")
        ax.set_xlabel("batch size (tokens per optimizer / outer step)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a3.set_yscale("log")
    save(fig, results, "fig2_fig3_batch_size.png")
    return by, target3, budget


def ablations(results, target):
    rs = runs(os.path.join(results, "ablations", "*"))
    if not rs:
        return rs
    fig, ax = plt.subplots(figsize=(7, 4.5))
    gn = runs(os.path.join(results, "fig1", "gn_full"))       # the reference: GN full itself
    for r in gn:
        curve(ax, r, "step", color="k", label="gn_full (Figure 1)", lw=2)
    v0 = max(r["val"][0][3] for r in rs + gn)                   # the shared start's loss
    lo = min(min(p[3] for p in r["val"]) for r in rs + gn)
    for i, r in enumerate(rs):                                  # a diverging run goes off scale
        off = max(p[3] for p in r["val"]) > v0 + 0.1
        curve(ax, r, "step", color=plt.cm.tab10(i), label=r["name"] + (" (off scale)" if off else ""))
    ax.set_ylim(min(lo, target) - 0.05, v0 + 0.1)
    ax.axhline(target, color="k", ls="--", lw=1)
    style(ax, "Ablations of full GN (from the shared start)", "outer steps")
    save(fig, results, "ablations.png")
    return rs


# ---------------------------------------------------------------- tables and text
def cg_summary(r):
    """A CG run's iterations, relative residual and rho over its steps (ranges); '-' otherwise."""
    cg = [row for row in r["rows"] if "cg_residual" in row]
    if not cg:
        return "-"
    span = lambda k, f: f"{min(x[k] for x in cg):{f}} to {max(x[k] for x in cg):{f}}"
    return f"{span('cg_iters', '.0f')}, {span('cg_residual', '.2f')}, {span('rho', '.2f')}"


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def fig1_table(rs, target):
    """Rows of Figure 1 and the best baseline's (steps, tokens, seconds) to the target."""
    hit = {r["name"]: to_target(r, target) for r in rs}
    base = [hit[m]["interp"] for m in BASELINES if hit.get(m)]
    best = tuple(min(b[i] for b in base) for i in range(3)) if base else None
    if best and not all(alone(r) for r in rs):      # seconds compared only between runs made alone
        best = best[:2] + (None,)
    lines = ["| run | lr | steps to target: first eval / interpolated | tokens (interp.) | "
             "seconds (interp.; alone?) | best baseline / run: steps, tokens, seconds | paper: steps to 3.25 |",
             "|---|---|---|---|---|---|---|"]
    for r in rs:
        h = hit[r["name"]]
        if h:
            ratio = " / ".join(fmt(b / x) if x and b else "-" for b, x in zip(best, h["interp"])) if best else "-"
            busy = {True: "alone", False: "not alone", None: "aloneness unknown"}[alone(r)]
            cells = [f"{h['first'][0]} / {h['interp'][0]:.2f}", f"{h['interp'][1]:,.0f}",
                     f"{h['interp'][2]:.0f} ({busy})", ratio]
        else:
            cells = [f"not reached in {final(r)[0]} (final {final(r)[3]:.4f})", "-", "-", "-"]
        lam = r["conf"]["args"].get("damping")                           # K-FAC's lam beside its lr
        lines.append(f"| {NAMES.get(r['name'], r['name'])} | {r['lr']:g}{f' (lam {lam:g})' if lam else ''} | "
                     + " | ".join(cells)
                     + f" | {PAPER.get(r['name'], '')} |")
    return "\n".join(lines), hit, best


def seeds_table(seeds, target):
    steps, ratios = seed_stats(seeds, target)
    if not steps:
        return "", None
    lines = ["| run | steps to target per seed (interpolated) | mean | range |", "|---|---|---|---|"]
    for m, ss in sorted(steps.items()):
        got = [s for s in ss if s is not None]
        lines.append(f"| {NAMES.get(m, m)} | " + ", ".join(fmt(s) for s in ss) + " | "
                     + (f"{sum(got) / len(got):.2f} | {min(got):.2f} - {max(got):.2f}" if got else "- | -")
                     + " |")
    got = [x for x in ratios if x]
    stat = (sum(got) / len(got), min(got), max(got), len(got), len(ratios)) if got else None
    if stat:
        lines.append("| **best baseline / GN full** | " + ", ".join(fmt(x) for x in ratios)
                     + f" | **{stat[0]:.2f}** | {stat[1]:.2f} - {stat[2]:.2f} |")
    return "\n".join(lines), stat


def summary(rs, hit, best, target, stat):
    """The headline sentences, each computed from the logs."""
    gn = hit.get("gn_full")
    out = []
    names = [m for m in BASELINES if hit.get(m)]
    bname = min(names, key=lambda m: hit[m]["interp"][0]) if names else None
    if gn and best:
        r = [b / x if b else None for b, x in zip(best, gn["interp"])]
        word = lambda x, what: f"{x:.2f}x fewer {what}" if x >= 1 else f"{1 / x:.2f}x more {what}"
        marks = {alone(x) for x in rs}
        unknown = None in marks and False not in marks
        secs = (f" and {word(r[2], 'seconds')}" if best[2] else
                "; seconds are not compared: " + ("the logs do not record whether every run had the "
                                                  "machine to itself" if unknown else
                                                  "not every run had the machine to itself"))
        out.append(f"GN full reaches the target in {gn['interp'][0]:.2f} steps (interpolated; first "
                   f"evaluation at or below it: step {gn['first'][0]}), the best first-order method "
                   f"({NAMES[bname]}) in {best[0]:.2f}: **{word(r[0], 'steps')}**, {word(r[1], 'tokens')} "
                   f"(line-search batches counted){secs}. The paper: 5.4x fewer steps than SOAP (292/54).")
        if first_step(gn):
            out.append("GN's first step already reaches the target, so this ratio divides the "
                       "baseline's steps by a fraction of one GN step: bounded by GN's step, not "
                       "measured (the target is too shallow to tell more).")
    elif best is None:
        out.append(f"No first-order baseline reached {target:.4f}.")
    if stat:
        out.append(f"Over {stat[4]} seeds the ratio is {stat[0]:.2f} on average, range "
                   f"{stat[1]:.2f} to {stat[2]:.2f}" + (f" ({stat[4] - stat[3]} seed(s) without a ratio: "
                                                       "a run did not reach the target)" if stat[3] < stat[4] else "") + ".")
    for r in rs:
        if not hit[r["name"]]:
            out.append(f"{NAMES.get(r['name'], r['name'])} does not reach the target in its "
                       f"{final(r)[0]} steps (final {final(r)[3]:.4f}).")
    return out


# ---------------------------------------------------------------- the axes (run.sh axes)
# The paper's Figure 1 on each axis: GN's inner steps per outer step, tokens per step per
# parameter (240M / 134M), and SOAP's steps to the target (its Figure 1: 292 to 3.25).
AXES = {"N": ("GN inner steps N per outer step (micro-batch = tokens / N)", 1831),
        "tokens": ("tokens per step per parameter", 240e6 / 134e6),
        "depth": ("best baseline's steps to the target (its budget x 0.8)", 292)}


TRIVIAL = " (GN's step 1)"   # the axes table's mark of a point whose target GN's first step reaches
TRIVIAL_NOTE = (f"{TRIVIAL.strip()}: GN full's first step already reaches the target, so the ratio "
                "divides the baseline's steps by a fraction of one GN step: bounded by GN's step, not "
                "measured (open circles in the figures); the headline leaves such points out.")


def point_of(results):
    """One plan's point: its coordinates on the axes and its ratio, from fig1/ and target.txt."""
    rs = {r["name"]: r for r in runs(os.path.join(results, "fig1", "*"))}
    if "gn_full" not in rs or not os.path.exists(os.path.join(results, "target.txt")):
        return None
    target, gn = target_of(results), rs["gn_full"]
    _, hit, best = fig1_table(list(rs.values()), target)      # best: the best baseline's (steps, ...)
    steps = lambda m: hit[m]["interp"][0] if hit.get(m) else None
    first = lambda m: hit[m]["first"][0] if hit.get(m) else None
    base_first = min((first(m) for m in BASELINES if first(m)), default=None)
    c = gn["conf"]
    return {"dir": results, "target": target, "N": gn["K"],
            "tokens": gn["K"] * c["tokens_per_micro_batch"] / c["params"],
            "tokens_per_step": gn["K"] * c["tokens_per_micro_batch"],
            "budget": max((final(rs[m])[0] for m in BASELINES if hit.get(m)), default=None),
            "baselines": {m: (rs[m]["lr"], steps(m)) for m in BASELINES if m in rs},
            "depth": best and best[0], "gn_lr": gn["lr"], "gn": steps("gn_full"),
            "ratio": best[0] / steps("gn_full") if best and steps("gn_full") else None,
            "ratio_first": base_first / first("gn_full") if base_first and first("gn_full") else None,
            "trivial": first_step(hit.get("gn_full")),
            "seeds": seeds_table(seed_runs(results), target)[1]}


def axes_points(results):
    """{axis: [points, sorted]}: each point of results/axes/ on the one axis where it differs
    from results' own (the centre of every axis)."""
    centre = point_of(results)
    if centre is None:
        return {}
    by = {}
    for d in sorted(glob.glob(os.path.join(results, "axes", "*", ""))):
        p = point_of(d.rstrip("/"))
        if p is None:
            continue
        moved = [k for k, key in (("N", "N"), ("tokens", "tokens_per_step"), ("depth", "budget"))
                 if p[key] != centre[key]]
        by.setdefault(moved[0] if len(moved) == 1 else "+".join(moved) or "none", []).append(p)
    for k in by:
        by[k] = sorted(by[k] + [centre], key=lambda p: p[k] or 0) if k in AXES else by[k]
    return by


def axes_section(results):
    by = axes_points(results)
    if not by:
        return []
    lines = ["| axis | point | N | tokens per step (per param) | baseline budget | target | baselines: lr, steps "
             "| GN lr | GN steps | ratio | ratio at evaluations | seeds: mean ratio [range] |", "|" + "---|" * 12]
    for axis, pts in by.items():
        for p in pts:
            bl = "; ".join(f"{m} {lr:g}: {fmt(st)}" for m, (lr, st) in p["baselines"].items())
            seeds = f"{p['seeds'][0]:.2f} [{p['seeds'][1]:.2f}, {p['seeds'][2]:.2f}] ({p['seeds'][4]})" if p["seeds"] else "-"
            lines.append(f"| {axis} | {os.path.relpath(p['dir'], results)} | {p['N']} | {p['tokens_per_step']:,} "
                         f"({p['tokens']:.3f}) | {p['budget']} | {p['target']:.4f} | {bl} | {p['gn_lr']:g} | "
                         f"{fmt(p['gn'])} | **{fmt(p['ratio'])}**{TRIVIAL if p['trivial'] else ''} | "
                         f"{fmt(p['ratio_first'])} | {seeds} |")
        if axis not in AXES:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        got = [p for p in pts if p["ratio"]]
        ax.plot([p[axis] for p in got], [p["ratio"] for p in got], "o-", color=COLORS["gn_full"], label="seed 0")
        for k in [k for k in by if k.startswith(axis + "+")]:   # points that moved another axis too
            more = [p for p in by[k] if p["ratio"]]
            ax.plot([p[axis] for p in more], [p["ratio"] for p in more], "D", color=COLORS["gn_full"],
                    label=f"seed 0, {k.split('+', 1)[1]} moved too")
            got += more
        if any(p["trivial"] for p in got):   # open markers: GN's first step reaches the target
            ax.plot([p[axis] for p in got if p["trivial"]], [p["ratio"] for p in got if p["trivial"]], "o",
                    ms=9, mfc="none", color="k", label="GN's first step reaches the target")
        for p in got:
            ax.annotate(f"{p['ratio']:.2f}", (p[axis], p["ratio"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if p["seeds"]:          # mean and range over the point's seeds
                mean, lo, hi, n = p["seeds"][:4]
                ax.errorbar([p[axis]], [mean], yerr=[[mean - lo], [hi - mean]], fmt="s", color="k", ms=4,
                            capsize=4, label=f"mean, range over {n} seeds")
        label, paper = AXES[axis]
        ax.axvline(paper, color="k", ls="--", lw=1, label=f"the paper's Figure 1: {paper:,.4g}")
        ax.axhline(292 / 54, color="tab:red", ls=":", lw=1, label="the paper's ratio: 5.4 (292 / 54)")
        ax.set_xscale("log")
        ax.set_ylim(0, max([6.0] + [p["ratio"] * 1.1 for p in got]))
        style(ax, f"axis {axis}: best baseline / GN full, steps", label, "ratio (steps to target)")
        save(fig, results, f"axes_{axis}.png")
    return ["## The ratio along the axes (run.sh axes)",
            f"Each point is the quick plan with one setting moved ({results}/axes/<point>; the point `.` "
            f"is {results}'s own plan), every method's lr swept at that point and its target by the "
            "same rule at its own budget; ratio = the best baseline's interpolated steps to the target "
            "over GN full's; at evaluations, the same ratio of the first evaluated steps at or below the "
            "target (whole steps: what the runs resolve without interpolation). The dashed line marks "
            "the paper's Figure-1 value of the axis.",
            "\n".join(lines) + ("\n\n" + TRIVIAL_NOTE if any(p["trivial"] for ps in by.values() for p in ps) else "")] + [f"![axis {k}](axes_{k}.png)" for k in by if k in AXES]


def kfac_line(results, hit, seeds, target):
    """Where K-FAC sits between the best baseline and layerwise GN, in steps to the target (and
    over its seeds) and in the oracle's f (oracle/oracle.jsonl): "" without a K-FAC row."""
    if "kfac" not in hit:
        return ""
    steps = lambda m: f"{hit[m]['interp'][0]:.2f}" if hit.get(m) else "not reached"
    bname = min((m for m in BASELINES if hit.get(m)), key=lambda m: hit[m]["interp"][0], default=None)
    ks = [x for x in seed_stats(seeds, target)[0].get("kfac", []) if x is not None]
    out = (f"K-FAC (beyond the paper) reaches the target in {steps('kfac')} steps"
           + (f" ({min(ks):.2f}-{max(ks):.2f} over {len(ks)} seeds)" if len(ks) > 1 else "")
           + (f"; {NAMES[bname]}, the best baseline, in {steps(bname)}" if bname else "")
           + (f", layerwise GN in {steps('gn_layerwise')}" if "gn_layerwise" in hit else "")
           + f", full GN in {steps('gn_full')}.")
    path = os.path.join(results, "oracle", "oracle.jsonl")
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    f = lambda m: [r["dirs"][m]["f"] for r in rows if m in r["dirs"]]
    rng = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}"
    if f("kfac"):
        others = [f"{NAMES[bname]}'s {rng(f(bname))}"] if bname and f(bname) else []
        others += [f"the layerwise oracle's {rng(f('layerwise'))}"] if f("layerwise") else []
        out += (f" Its steps keep f = {rng(f('kfac'))} of the damped GN model's best decrease"
                + (f" ({', '.join(others)})" if others else "") + ".")
        fk = [x for r in rows if "f_k" in r["dirs"].get("kfac", {})
              for name, x in zip(r["blocks"], r["dirs"]["kfac"]["f_k"]) if name.startswith("h[")]
        if fk:
            out += f" Per transformer block they keep f_k = {rng(fk)} of the layerwise oracle's decrease."
    return out


def readme_headline(rs, hit, best, stat, kfac=""):
    """The README's lines: Figure 1's ratio, its seeds' range, the paper's; K-FAC's place."""
    gn = hit.get("gn_full")
    if not (rs and gn and best):
        return "Not yet measured: GN full or every baseline misses the target (results.md)."
    conf = rs[0]["conf"]
    bname = min((m for m in BASELINES if hit.get(m)), key=lambda m: hit[m]["interp"][0])
    seeds = (f"; over {stat[4]} seeds {stat[0]:.2f}x ({stat[1]:.2f}-{stat[2]:.2f})" if stat else "")
    return (f"{conf['params'] / 1e6:.1f}M parameters, {rs[0]['K'] * conf['tokens_per_micro_batch']:,} tokens "
            f"per step, every row's lr swept by one rule: **full GN reaches the target in "
            f"{gn['interp'][0]:.2f} steps, "
            f"{NAMES[bname]} (the best baseline) in {best[0]:.2f}: {best[0] / gn['interp'][0]:.2f}x fewer "
            f"steps{seeds}**.\nThe paper, at 150M parameters and 240M tokens per GN step: 5.4x (SOAP 292 "
            "steps, GN 54)." + (f"\n{kfac}" if kfac else ""))


def readme_table(rs, hit, seeds, target):
    """The README's table: each Figure-1 row's lr from its own sweep, its steps to the target and
    the spread over the seeds (rows without seed runs: seed 0 only)."""
    steps, ratios = seed_stats(seeds, target)
    lines = ["| Figure 1's row | lr (its own sweep) | steps to the target, seed 0 | over the seeds |",
             "|---|---|---|---|"]
    for r in sorted(rs, key=lambda r: list(NAMES).index(r["name"]) if r["name"] in NAMES else len(NAMES)):
        h, lam = hit[r["name"]], r["conf"]["args"].get("damping")
        lines.append(f"| {NAMES.get(r['name'], r['name'])} | {r['lr']:g}{f' (lam {lam:g})' if lam else ''} | "
                     + (f"{h['interp'][0]:.2f}" if h else f"not reached in {final(r)[0]}") + " | "
                     + (spread(steps[r["name"]]) if r["name"] in steps else "seed 0 only") + " |")
    if ratios:
        lines.append(f"| **best baseline / GN full** | | {fmt(ratios[0])} | {spread(ratios)} |")
    return "\n".join(lines)


def headline_at(results):
    """The axes' point with seeds and the largest mean ratio over them, of those where GN's first
    step does not already reach the target, when that mean exceeds results' own; else None."""
    pts = {p["dir"]: p for ps in axes_points(results).values() for p in ps
           if p["seeds"] and p["dir"] != results and not p["trivial"]}
    if not pts:
        return None
    p, centre = max(pts.values(), key=lambda p: p["seeds"][0]), point_of(results)
    return None if centre["seeds"] and centre["seeds"][0] >= p["seeds"][0] else p


def headline_point(results):
    """headline_at's point, its Figure 1 in the summary's sentences (the README's headline beside
    results' own), or ""."""
    p = headline_at(results)
    if p is None:
        return ""
    rs = runs(os.path.join(p["dir"], "fig1", "*"))
    _, hit, best = fig1_table(rs, p["target"])
    name = os.path.relpath(p["dir"], results)
    return (f"**At {name}** ({p['N']} inner steps of {p['tokens_per_step'] // p['N']:,} tokens, "
            f"{p['tokens_per_step']:,} tokens per step, a {p['budget']}-step baseline budget, target "
            f"{p['target']:.4f}; its Figure 1 and tables: {name}/results.md): "
            + " ".join(summary(rs, hit, best, p["target"], p["seeds"])))


# ---------------------------------------------------------------- what matches the paper
def point_name(p):
    """A point's name: its directory under axes/, or the results directory's own for the centre."""
    return os.path.basename(os.path.normpath(p["dir"]))


def per_seed(p, m=None):
    """A point's per-seed values, seed 0 first (None: a run missed the target): the ratio best
    baseline / GN full, or row m's steps to the target."""
    seeds = seed_runs(p["dir"])
    if m is None:
        return seed_stats(seeds, p["target"])[1] if seeds else [p["ratio"]]
    if m in seeds:
        return seed_stats(seeds, p["target"])[0][m]
    fig1 = os.path.join(p["dir"], "fig1", m)
    return [steps_to(load(fig1), p["target"])] if os.path.exists(os.path.join(fig1, "metrics.jsonl")) else []


def spread(xs):
    """'mean [lo-hi] (n seeds)' over the values measured, '2.91 (1 seed)', or 'not reached'."""
    got = [x for x in xs if x is not None]
    miss = f", {len(xs) - len(got)} not reached" if len(got) < len(xs) else ""
    if not got:
        return "not reached" + (f" ({len(xs)} seeds)" if len(xs) > 1 else "")
    if len(xs) == 1:
        return f"{got[0]:.2f} (1 seed)"
    return f"{sum(got) / len(got):.2f} [{min(got):.2f}-{max(got):.2f}] ({len(xs)} seeds{miss})"


def apart(a, b):
    """Whether two sets of per-seed values are told apart: each has 3 seeds, all measured, and
    their ranges do not overlap (the rule every verdict below uses)."""
    ok = lambda xs: len(xs) >= 3 and None not in xs
    return ok(a) and ok(b) and (max(a) < min(b) or max(b) < min(a))


def trend(pts, unit):
    """The ratio along one axis: each point's seeds, and what they tell apart (the rule of apart)."""
    pts = [p for p in pts if not p["trivial"]]
    vals = [per_seed(p) for p in pts]
    said = "; ".join(f"{unit(p)} ({point_name(p)}): {spread(v)}" for p, v in zip(pts, vals))
    if len(pts) < 2:
        return said, "fewer than two points that GN's first step does not settle: no trend measured"
    means = [sum(x for x in v if x) / max(1, sum(1 for x in v if x)) for v in vals]
    pairs = [apart(a, b) for a, b in zip(vals, vals[1:])]
    ends = apart(vals[0], vals[-1])
    if all(pairs) and all(x < y for x, y in zip(means, means[1:])):
        verdict = "the ratio rises at every step of the axis, each point apart from the next (3 seeds each, ranges disjoint)"
    elif all(pairs) and all(x > y for x, y in zip(means, means[1:])):
        verdict = "the ratio falls at every step of the axis, each point apart from the next (3 seeds each, ranges disjoint)"
    elif ends:
        verdict = (f"the ratio {'rises' if means[-1] > means[0] else 'falls'} from the first point to the last "
                   "(3 seeds each, ranges disjoint); neighbouring points are not all told apart")
    else:
        verdict = ("the points are not told apart: the first and last points' seed ranges overlap, or "
                   "either has fewer than 3 seeds measured")
    return said, verdict


def claims(results, by2=None, budget=None):
    """'What matches the paper': each claim of the paper (or question of this plan) that the runs
    test, with the points and seeds it rests on and a verdict by one stated rule (apart); by2 and
    budget: Figures 2-3's runs (figures23). [] before Figure 1 has GN full and a target."""
    centre = point_of(results)
    if centre is None:
        return []
    by = axes_points(results)
    pts = [p for ps in by.values() for p in ps if p["dir"] != results] + [centre]
    out = []
    ratios = {point_name(p): per_seed(p) for p in pts}
    wins = sum(1 for v in ratios.values() for x in v if x and x > 1)
    total = sum(len(v) for v in ratios.values())
    lost = [f"{k} ({spread(v)})" for k, v in ratios.items() if any(not x or x <= 1 for x in v)]
    out.append(f"**GN full needs fewer steps than every first-order baseline** (the paper's Figure 1): in "
               f"{wins} of {total} runs (point, seed) at {len(ratios)} point{'s' * (len(ratios) > 1)} ("
               + ", ".join(f"{k}: {len(v)} seed{'s' * (len(v) > 1)}" for k, v in sorted(ratios.items())) + ")"
               + (f"; not in {', '.join(lost)}" if lost else "") + ".")
    real = [p for p in pts if not p["trivial"] and len(per_seed(p)) >= 3 and None not in per_seed(p)]
    if real:
        top = max(real, key=lambda p: sum(per_seed(p)) / len(per_seed(p)))
        out.append(f"**The size of the gap** (the paper: 5.4x, SOAP 292 steps / GN 54): the largest mean "
                   f"ratio over 3 seeds at a point that GN's first step does not settle is at {point_name(top)}, "
                   f"{spread(per_seed(top))}; "
                   + ("it reaches" if min(per_seed(top)) >= 292 / 54 else "no measured point reaches")
                   + " the paper's 5.4x.")
    for axis, head, unit in (
            ("tokens", "**Tokens per step** (the paper's Figures 2-3: GN's advantage grows with the batch)",
             lambda p: f"{p['tokens_per_step']:,} tokens"),
            ("depth", "**The depth of the target** (this plan's question: the paper's target lies 292 SOAP "
             "steps deep)", lambda p: f"{p['budget']}-step budget")):
        if axis in by:
            said, verdict = trend(by[axis], unit)
            settled = [point_name(p) for p in by[axis] if p["trivial"]]
            out.append(f"{head}: best baseline / GN full at {said}; {verdict}"
                       + (f"; left out: {', '.join(settled)} (GN's first step reaches its target)" if settled else "")
                       + ".")
    if "N" in by:
        n = by["N"]
        out.append("**GN's inner steps N** at fixed tokens per step (the paper: N = 1831): ratio at evaluations "
                   "(whole steps) " + ", ".join(f"N = {p['N']}: {fmt(p['ratio_first'])}" for p in n)
                   + "; interpolated " + ", ".join(f"{fmt(p['ratio'])}" for p in n)
                   + ", with GN's lr " + ", ".join(f"{p['gn_lr']:g}" for p in n)
                   + ". " + ("Equal at evaluations: the differences lie inside the interpolation between two "
                             "GN steps. " if len({p["ratio_first"] for p in n}) == 1 else "")
                   + "This axis says whether more, smaller inner steps on the same tokens move the ratio at "
                   f"this size; it cannot say what the paper's N = 1831 inner steps of 131,072 tokens each "
                   f"would do (here {n[-1]['tokens_per_step'] // n[-1]['N']:,} to "
                   f"{n[0]['tokens_per_step'] // n[0]['N']:,} tokens each).")
    if by2 and "gn_full" in by2:
        loss = {m: {b: final(r)[3] for b, r in pts} for m, pts in by2.items()}
        cells, below = [], []
        for b in sorted({b for pts in by2.values() for b, _ in pts}):
            bs = [m for m in BASELINES if b in loss.get(m, {})]
            if b in loss["gn_full"] and bs:
                bm = min(bs, key=lambda m: loss[m][b])
                cells.append(f"{b}: GN {loss['gn_full'][b]:.4f}, {NAMES[bm]} {loss[bm][b]:.4f}")
                below.append((b, loss["gn_full"][b] < loss[bm][b]))
        out.append(f"**The batch at a fixed budget** (the paper's Figures 2-3: GN keeps more of its "
                   f"efficiency as the batch grows): final validation loss after {budget} micro-batches, at "
                   f"each count of micro-batches per step, GN full and the best baseline there: "
                   + "; ".join(cells) + f" (1 seed; each method at its Figure-1 lr, tuned at {centre['N']}). "
                   "GN ends below the best baseline at "
                   + (", ".join(str(b) for b, x in below if x) or "none") + f" of {', '.join(str(b) for b, _ in below)}.")
    for m, paper in (("gn_layerwise", "the paper: 78 steps against GN's 54, 1.44x"),
                     ("gn_proxlinear", "the paper: it matches GN"),
                     ("gn_proxlinear_no_ls", "the paper: it matches GN")):
        where = [p for p in pts if per_seed(p, m)]
        if where:
            vs = [[x / g if x and g else None for x, g in zip(per_seed(p, m), per_seed(p, "gn_full"))] for p in where]
            out.append(f"**{NAMES[m]} / GN full, steps** ({paper}): " + "; ".join(
                f"{point_name(p)}: {spread(v)}, {versus_gn(v)}" for p, v in zip(where, vs)) + ".")
    return out


def versus_gn(xs):
    """A variant's steps over GN full's, one value per seed, told apart from 1 by the rule of apart:
    3 seeds, all measured, every one on the same side of 1."""
    if len(xs) < 3 or None in xs:
        return "not told apart from GN (fewer than 3 seeds measured)"
    if min(xs) > 1:
        return "more steps than GN in every seed"
    if max(xs) < 1:
        return "fewer steps than GN in every seed"
    return "not told apart from GN (its seeds are not all on one side of 1)"


# ---------------------------------------------------------------- r(k): baseline steps per GN step
def r_of_k(gn, other):
    """[(k, r(k))] at each of GN full's evaluated steps k >= 1: `other`'s steps to GN's validation
    loss at its step k, over k; None where other's logged curve never gets that low. GN's side is
    a whole step, exact; only other's crossing is interpolated, inside one of its own steps (every
    step of Figure 1's runs is evaluated)."""
    whole = dict(other, val=other["val_all"])
    return [(k, s / k if (s := steps_to(whole, loss)) is not None else None)
            for k, _, _, loss in gn["val_all"] if k >= 1]


def rk_rows(results):
    """{row: {k: {seed: r(k)}}} at one point, each row's seed i against GN full's seed i, at the k
    that GN's seed i logged: each baseline; "best", the fewest steps of any baseline to GN's loss
    (so the smallest r of the three); and every other Figure-1 row (layerwise, prox-linear, K-FAC)."""
    seeds = {r["name"]: [r] for r in runs(os.path.join(results, "fig1", "*"))} | seed_runs(results)
    out = {}
    for i, gn in enumerate(seeds.pop("gn_full", [])):
        per = {m: dict(r_of_k(gn, rs[i])) for m, rs in seeds.items() if i < len(rs)}
        for k in [k for k, *_ in gn["val_all"] if k >= 1]:
            got = [per[m][k] for m in BASELINES if per.get(m, {}).get(k) is not None]
            for m, v in [("best", min(got) if got else None)] + [(m, per[m][k]) for m in per]:
                out.setdefault(m, {}).setdefault(k, {})[i] = v
    return out


def rk_cell(by_seed):
    """'mean [lo-hi] (n seeds)' of r(k) over the seeds that logged step k; 'not reached' counts the
    seeds whose run's logged curve stops above GN's loss (at its budget, or at the target)."""
    got = sorted(v for v in by_seed.values() if v is not None)
    miss = len(by_seed) - len(got)
    if not got:
        return "not reached"
    mean = sum(got) / len(got)
    cell = f"{mean:.2f}" + (f" [{got[0]:.2f}-{got[-1]:.2f}]" if len(got) > 1 else "")
    if len(by_seed) > 1:
        cell += f" ({len(by_seed)} seeds" + (f", {miss} not reached" if miss else "") + ")"
    return cell


RK_ROWS = ("best", *BASELINES, "gn_layerwise", "gn_proxlinear", "gn_proxlinear_no_ls", "kfac")


def rk_table(rows):
    cols = [m for m in RK_ROWS if m in rows]
    head = ["best baseline" if m == "best" else NAMES[m] for m in cols]
    lines = ["| k | " + " | ".join(head) + " |", "|" + "---|" * (len(cols) + 1)]
    for k in sorted(rows["best"]):
        lines.append(f"| {k} | " + " | ".join(rk_cell(rows[m].get(k, {})) if rows[m].get(k) else "-"
                                               for m in cols) + " |")
    return "\n".join(lines)


def rk_points(results):
    """The points of r(k)'s figure: the tokens axis (with results' own), else results' own alone."""
    by = axes_points(results)
    return by.get("tokens") or [p for p in [point_of(results)] if p]


def rk_band(ax, by_k, color, label):
    """One row's r(k) against k: the mean over its seeds, and their range as a band."""
    ks = [k for k in sorted(by_k) if any(v is not None for v in by_k[k].values())]
    vals = [[v for v in by_k[k].values() if v is not None] for k in ks]
    ax.plot(ks, [sum(v) / len(v) for v in vals], "o-", color=color, label=label)
    ax.fill_between(ks, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.2)


def rk_figure(results, rows_at):
    """r(k) against k: the best baseline at each point of the tokens axis (mean, and its seeds'
    range as a band), and the other rows against GN at results' own point."""
    rows, pts = rows_at[results], rk_points(results)
    others = [m for m in RK_ROWS[4:] if m in rows]
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 6 * bool(others), 4.5), squeeze=False)
    a1 = axes[0][0]
    for i, p in enumerate(pts):
        rk_band(a1, rows_at[p["dir"]]["best"], plt.cm.viridis(i / max(len(pts) - 1, 1)),
                f"{p['tokens_per_step']:,} tokens per step ({point_name(p)})")
    for m in others:
        rk_band(axes[0][1], rows[m], COLORS[m], NAMES[m])
    for ax in axes[0]:
        ax.axhline(1, color="k", lw=0.8)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    a1.axhline(292 / 54, color="tab:red", ls=":", lw=1, label="the paper's steps ratio: 5.4 (292 / 54)")
    style(a1, "best baseline's steps per GN step, r(k) (mean, seed range)", "GN full's step k",
          "r(k) = baseline steps to GN's loss at k / k")
    if others:
        style(axes[0][1], f"each row's steps per GN step at {point_name(point_of(results))}", "GN full's step k",
              "r(k) = row's steps to GN's loss at k / k")
    save(fig, results, "r_of_k.png")


def rk_claims(results, rows_at):
    """r(k) for 'What matches the paper': its definition, its trend along the tokens axis at each
    k that every point logged (the rule of apart), each a sentence; and one table of the mean over
    seeds per k, the best baseline at each point of the tokens axis and each other row against GN
    at results' own point (ranges: results.md's r(k) section)."""
    pts = rk_points(results)
    per = lambda p, m, k: [v for _, v in sorted(rows_at[p["dir"]].get(m, {}).get(k, {}).items())]
    out = ["**Baseline steps per GN step, r(k)**: GN full's validation loss at its whole step k is "
           "exact; a row's steps to that loss are interpolated on its every-step curve and divided by "
           "k; the best baseline is the fewest steps of the three. The table below gives the mean over "
           "seeds; (n of m): n of the m seeds whose GN logged step k reached its loss there."]
    common = sorted(set.intersection(*[set(rows_at[p["dir"]]["best"]) for p in pts])) if len(pts) > 1 else []
    if common:
        said = {}
        for k in common:
            vals = [per(p, "best", k) for p in pts]
            means = [sum(x for x in v if x) / max(1, sum(1 for x in v if x)) for v in vals]
            if all(apart(a, b) for a, b in zip(vals, vals[1:])):
                word = ("rises" if all(x < y for x, y in zip(means, means[1:])) else
                        "falls" if all(x > y for x, y in zip(means, means[1:])) else "moves, not monotonically,")
                said.setdefault(f"the best baseline's r(k) {word} at every step of the tokens axis "
                                "(3 seeds at each point, ranges disjoint)", []).append(k)
            else:
                said.setdefault("neighbouring points of the tokens axis are not all told apart", []).append(k)
        ks = lambda x: f"k = {x[0]}" if len(x) == 1 else f"k = {', '.join(map(str, x[:-1]))} and {x[-1]}"
        out.append("**r(k) along the tokens axis**: " + " ".join(
            f"At {ks(x)}, {text}." for text, x in said.items()))
    rows, own = rows_at[results], point_name(point_of(results))
    table = [(f"best baseline, {p['tokens_per_step']:,} tokens per step ({point_name(p)})",
              rows_at[p["dir"]]["best"]) for p in pts] + [(f"{NAMES[m]} at {own}", rows[m]) for m in RK_ROWS[4:] if m in rows]
    K = max(k for _, by_k in table for k in by_k)

    def cell(by_seed):
        got = [v for v in by_seed.values() if v is not None]
        if not got:
            return "not reached" if by_seed else ""
        return f"{sum(got) / len(got):.2f}" + (f" ({len(got)} of {len(by_seed)})" if len(got) < len(by_seed) else "")
    lines = ["| r(k), mean over seeds | " + " | ".join(f"k = {k}" for k in range(1, K + 1)) + " |",
             "|" + "---|" * (K + 1)] + [f"| {name} | " + " | ".join(cell(by_k.get(k, {})) for k in range(1, K + 1))
                                        + " |" for name, by_k in table]
    return out, "\n".join(lines)


def oracle_summary(results):
    """The oracle in one paragraph, from oracle/oracle.jsonl: f and e of the step each run takes
    (GN along its run, per step), the layerwise oracle's f, over every point, set and lam."""
    path = os.path.join(results, "oracle", "oracle.jsonl")
    rng = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"
    if not os.path.exists(path):
        return ""
    rows = [json.loads(line) for line in open(path)]
    val = lambda n, k, sel=rows: [r["dirs"][n][k] for r in sel if n in r["dirs"]]
    lams = sorted({r["lam"] for r in rows})
    gn = sorted({r["point"] for r in rows if "gn_full" in r["dirs"]})
    per = "; ".join(f"lam {lam:g}: " + ", ".join(
        f"{sum(v) / len(v):.2f}" for p in gn if (v := val("gn_full", "f", [r for r in rows if r["point"] == p
                                                                            and r["lam"] == lam])))
        for lam in lams)
    base = [m for m in (*BASELINES, "kfac") if val(m, "f")]
    text = (f"Oracle (oracle.py, {len(rows)} measurements; the GN model of K = {rows[0]['K']} micro-batches "
            f"({rows[0]['tokens']:,} tokens) of each step's own batch, lam {', '.join(f'{x:g}' for x in lams)}): "
            f"along GN full's Figure-1 run (steps {gn[0]}-{gn[-1]}), the direction it takes (its warm-started "
            f"d) keeps f = {rng(val('gn_full', 'f'))} of the damped model's best decrease (per step, mean "
            f"over sets: {per}) and e = q(d)/q(d*) = {rng(val('gn_full', 'e'))} of the reference solve's "
            "decrease; the other methods' own steps keep f = " + ", ".join(f"{NAMES[m]} {rng(val(m, 'f'))}" for m in base)
            + f" (steps {sorted({r['point'] for r in rows if any(m in r['dirs'] for m in base)})})")
    if val("layerwise", "f"):
        text += (f"; the layerwise oracle d_LW keeps f = {rng(val('layerwise', 'f'))} (steps "
                 f"{sorted({r['point'] for r in rows if 'layerwise' in r['dirs']})})")
    text += f". CG residuals of d*: {rng([r['residual'] for r in rows])}."
    return text


def write_results(results, target, rs, by, target3, budget, abl, sweep_by, seeds, readme):
    md_table, hit, best = fig1_table(rs, target)
    s_table, stat = seeds_table(seeds, target)
    K = rs[0]["K"] if rs else None
    tok = rs[0]["conf"]["tokens_per_micro_batch"] if rs else None
    head, at = summary(rs, hit, best, target, stat), headline_point(results)
    kfac = kfac_line(results, hit, seeds, target)
    head += [kfac] if kfac else []
    parts = [f"Target validation loss: **{target!r}** (OUT/target.txt: the baselines' lowest "
             f"validation loss at 80% of the budget, as run.sh states). Figure 1 runs {K} "
             f"micro-batches of {tok:,} tokens per step." if rs else "", " ".join(head), at,
             "![Figure 1](fig1_iterations.png)", md_table]
    if s_table:
        parts += ["Seeds (the start's init and the data order): seed 0 is the Figure-1 run.", s_table]
    if sweep_by:
        rows = []
        for m, srs in sorted(sweep_by.items()):
            srs = sorted(srs, key=lambda r: r["lr"])
            bestr = min(srs, key=lambda r: rank_key(r, target))
            cell = lambda r: (f"{h['interp'][0]:.2f} steps" if (h := to_target(r, target))
                              else f"{final(r)[3]:.4f} at step {final(r)[0]}")
            rows.append(f"| {display(m)} | " + ", ".join(
                f"{'**' if r is bestr else ''}{r['lr']:g}: {cell(r)}{'**' if r is bestr else ''}" for r in srs) + " |")
        parts += ["![sweeps](sweeps.png)", "Learning-rate sweeps, every method ranked by one rule "
                  "(plot.rank_key): fewest interpolated steps to the target, then the lowest final "
                  "validation loss; each run to its budget or the target; the best in bold:",
                  "| method | lr: steps to target (or final loss at its last step) |\n|---|---|\n" + "\n".join(rows)]
    if by:
        rows = []
        for method, pts in sorted(by.items()):
            for b, r in sorted(pts, key=lambda p: p[0]):
                h = to_target(r, target3)
                rows.append(f"| {method} | {b} ({b * r['conf']['tokens_per_micro_batch']:,} tokens) | "
                            f"{budget // b} | {final(r)[3]:.4f} | "
                            + (f"{h['interp'][0]:.2f}" if h else f"not reached in {final(r)[0]}") + " |")
        parts += [f"Figures 2-3: {budget} micro-batches at each batch size (the point at {K} is the "
                  f"Figure-1 run cut at step {budget // K if K else '-'}); steps to {target3:.4f}, "
                  "AdamW's own loss at its middle batch:", "![Figures 2-3](fig2_fig3_batch_size.png)",
                  "| method | micro-batches per step | steps | final val | steps to the loss |\n"
                  "|---|---|---|---|---|\n" + "\n".join(rows)]
    if abl:
        parts += ["![ablations](ablations.png)", "Ablations of GN full (same start, lr, batch and target "
                  "as Figure 1, whose table has GN full itself; CG: its iterations per step, its relative "
                  "residual |r|/|b| and rho, the loss decrease over the CG model's, over its steps):",
                  "| variant | steps to target: first / interp. | final val (step) | CG: iterations, "
                  "residual, rho |\n|---|---|---|---|\n" + "\n".join(
                      f"| {r['name']} | " + (f"{h['first'][0]} / {h['interp'][0]:.2f}" if (h := to_target(r, target))
                                             else "not reached") + f" | {final(r)[3]:.4f} ({final(r)[0]}) | "
                      + cg_summary(r) + " |" for r in abl)]
    oracle, ora = os.path.join(results, "oracle", "oracle.md"), oracle_summary(results)
    said = claims(results, by, budget)
    rows_at = {p["dir"]: rk_rows(p["dir"]) for p in rk_points(results)} | {results: rk_rows(results)}
    rk_tab = ""
    if rows_at[results].get("best"):
        rk_figure(results, rows_at)
        rk_said, rk_tab = rk_claims(results, rows_at)
        said += rk_said
    if said:
        parts += ["## What matches the paper", "Each claim names the points and seeds it rests on. Two "
                  "points count as different only when each has 3 seeds, all reaching the target, and "
                  "their ranges do not overlap (plot.apart).", "\n".join(f"- {c}" for c in said), rk_tab]
    if rows_at[results].get("best"):
        pts = [point_of(results)] + [p for ps in axes_points(results).values() for p in ps if p["dir"] != results]
        parts += ["## r(k): each row's steps per GN full step", "r(k) = a row's steps to GN full's validation "
                  "loss at GN's step k, over k, seed i against GN's seed i (GN's side a whole step, exact; "
                  "the row's crossing interpolated on its curve, evaluated every step); the best baseline: "
                  "the fewest steps of the three. Mean [range] over the seeds that logged step k; not "
                  "reached: the row's logged curve stops above that loss (at its budget, or at the target).",
                  "![r(k)](r_of_k.png)"]
        for p in pts:
            rows = rows_at.get(p["dir"]) or rk_rows(p["dir"])
            if rows.get("best"):
                parts += [f"{point_name(p)}: {p['N']} micro-batches per step, {p['tokens_per_step']:,} tokens "
                          f"per step, target {p['target']:.4f}", rk_table(rows)]
    axes = axes_section(results)
    parts += axes
    if ora:
        parts += ["## The oracle gap and the inner solve's exactness (oracle.py)", ora]
    if os.path.exists(oracle):
        parts += ["![oracle](oracle/oracle.png)", open(oracle).read().strip()]
    text = "\n\n".join(p for p in parts if p) + "\n"
    open(os.path.join(results, "results.md"), "w").write(PREAMBLE + text)
    if readme:
        src = open(readme).read()
        if README_BEGIN not in src or README_END not in src:
            print(f"error: {readme} has no {README_BEGIN} ... {README_END} section", file=sys.stderr)
            sys.exit(2)
        a, b = src.index(README_BEGIN) + len(README_BEGIN), src.index(README_END)
        block = readme_headline(rs, hit, best, stat, kfac) + "\n\n" + readme_table(rs, hit, seeds, target)
        if said:
            block += ("\n\n**What matches the paper.** Each claim names the points and seeds it rests on. Two "
                      "points count as different only when each has 3 seeds and their ranges do not overlap.\n"
                      + "\n".join(f"- {c}" for c in said)
                      + (f"\n\n{rk_tab}" if rk_tab else ""))
        open(readme, "w").write(src[:a] + "\n" + block + "\n" + src[b:])
    return text


def label(run):
    """A run's legend: its directory, script, size and lr (its config.json)."""
    a = run["conf"]["args"]
    return f"{run['name']}: {a.get('method', '?')} --size {a.get('size', '?')}, lr {a.get('lr', '-')}"


def runs_figure(rs, out, target=None):
    """Validation (top, with the target) and train loss (bottom) of any runs against steps, tokens
    and seconds."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharey="row")
    for r in rs:
        val = r["val"]
        train = [(x["step"], x["tokens"], x.get("elapsed", 0.0), x["train_loss"]) for x in r["rows"]
                 if "train_loss" in x]
        for row, pts in enumerate((val, train)):
            for col in range(3):
                axes[row, col].plot([p[col] for p in pts], [p[3] for p in pts], "o-", ms=3, label=label(r))
    for col, x in enumerate(("step", "tokens", "seconds (steps only, compilation apart)")):
        axes[1, col].set_xlabel(x)
    axes[0, 0].set_ylabel("validation loss")
    axes[1, 0].set_ylabel("train loss")
    if target is not None:
        for ax in axes[0]:
            ax.axhline(target, color="k", ls=":", lw=1, label=f"target {target:g}")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def runs_table(rs, target):
    """A markdown line per run: its steps, final validation loss and steps to the target."""
    lines = ["| run | steps | final val_loss | steps to the target: first eval / interpolated |",
             "|---|---|---|---|"]
    for r in rs:
        hit = to_target(r, target) if target is not None and r["val"] else None
        reach = "-" if target is None else (f"{hit['first'][0]} / {hit['interp'][0]:.2f}" if hit else "not reached")
        fin = f"{final(r)[3]:.4f} (step {final(r)[0]})" if r["val"] else "-"
        lines.append(f"| {label(r)} | {r['rows'][-1]['step'] if r['rows'] else 0} | {fin} | {reach} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--pick"]:
        print(pick(argv[1], argv[2:]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="the results directory written by run.sh, or run "
                   "directories written by any script (each with its config.json and metrics.jsonl)")
    p.add_argument("--target", type=float, default=None, help="target validation loss (default: "
                   "RESULTS/target.txt; run directories: none)")
    p.add_argument("--readme", default=None, help="also rewrite the generated results section of "
                   "this README (between its results:begin and results:end markers)")
    p.add_argument("--out", default="runs.png", help="run directories: the figure's file (runs.png)")
    a = p.parse_args(argv)
    is_run = [os.path.exists(os.path.join(d, "metrics.jsonl")) for d in a.dirs]
    if any(is_run):
        if not all(is_run):
            p.error("not run directories (no metrics.jsonl): " + ", ".join(
                d for d, ok in zip(a.dirs, is_run) if not ok))
        rs = [load(d) for d in a.dirs]
        runs_figure(rs, a.out, a.target)
        print(runs_table(rs, a.target) + f"\n\n![runs]({a.out})")
        return
    if len(a.dirs) > 1:
        p.error("give one results directory, or run directories (each with a metrics.jsonl)")
    results = a.dirs[0]
    target = target_of(results, a.target)
    rs = runs(os.path.join(results, "fig1", "*"))
    seeds = seed_runs(results)
    if rs:
        figure1(results, rs, target, seeds)
    sweep_by = sweeps(results)
    by, target3, budget = figures23(results, rs)
    abl = ablations(results, target)
    print(write_results(results, target, rs, by, target3, budget, abl, sweep_by, seeds, a.readme))


if __name__ == "__main__":
    main()
