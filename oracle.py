"""The oracle gap: how much of the Gauss-Newton step AdamW, Muon and SOAP capture, block by block.

The paper concludes (its Section 6) that "a significant performance gap exists between current
approximate methods and an idealized layerwise oracle", from iteration counts. This tool measures
the gap at one point, on one batch. At parameters theta with a fixed batch of K micro-batches, g
the gradient and G the Gauss-Newton matrix on it (gn_full.gn_model) and a damping lam:

    Delta(u) = (g^T u)^2 / (2 u^T (G + lam I) u)   if g^T u < 0, else 0
             = the decrease of the damped GN model q(s u) = g^T s u + 1/2 s^2 u^T (G + lam I) u
               at its best scale s (a method's lr only scales u, so Delta ignores it)
    f(u)     = Delta(u) / Delta(d*),   d* = -(G + lam I)^-1 g   (CG to relative residual --tol)

f(d*) = 1 and 0 <= f <= 1 (Cauchy-Schwarz in the (G + lam I) norm). Per block k (the K = L + 2
blocks of gn_layerwise.py: wte, each transformer block, lm_head), f_k(u_k) uses g_k and the
diagonal block G_kk, against d_LW,k = -(G_kk + lam I)^-1 g_k, the layerwise oracle (f_k = 1 by
definition); cos_k is the cosine of u_k and d*_k. Reported per direction u:
    adamw, muon, soap   the method's next update at that point: its optimizer.update on g, from
                        its own optimizer state (SOAP's first call from a fresh state only builds
                        its preconditioner, u = 0: at a fresh state SOAP's u is its second call)
    layerwise           d_LW: f(d_LW) is what the block-diagonal preconditioner loses by ignoring
                        the curvature across blocks
    gn_inner            the direction d = theta-hat - theta of gn_full.py's inner solver
                        (Algorithm 1 with Figure 1's settings: N inner steps from a fresh state,
                        here cycling over the measured batch's micro-batches, so that it solves
                        the same model as d*): how exact the paper's own solve is

    python oracle.py --results results/quick [--points 0,8] [--lams 1e-3,1e-2] [--out DIR]

Points: 0 is the shared start (RESULTS/start/ckpt, every method with a fresh optimizer state);
p > 0 is each baseline at step p of its own Figure-1 trajectory: the checkpoint at step p of
RESULTS/fig1/<method> or of the sweep run it continues (RESULTS/sweep/<method>_<lr>); run.sh
keeps those at the sweep's last step (8) and the run's last (14), each with the one before. Writes
OUT/oracle.jsonl (every number), OUT/oracle.md (tables) and OUT/oracle.png.
"""
import argparse
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import adamw
import data
import gn_full
import gn_layerwise
import model
import muon
import soap

METHODS = {"adamw": adamw, "muon": muon, "soap": soap}

# ============================================================================ config


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--results", required=True, help="a results directory of run.sh quick (start/, "
                   "sweep/, fig1/)")
    p.add_argument("--points", default="0,8", help="steps of the baselines' trajectories to measure "
                   "at, comma-separated (0: the shared start) (default 0,8)")
    p.add_argument("--lams", default="1e-3,1e-2", help="damping values lam, comma-separated "
                   "(default 1e-3,1e-2)")
    p.add_argument("--batches", type=data.pos_int, default=2, help="independent batches at each point, "
                   "for the batch-to-batch spread (default 2)")
    p.add_argument("--micro-batches", type=data.pos_int, default=1, help="K: micro-batches (of the "
                   "runs' batch size) in each batch that defines g and G (default 1)")
    p.add_argument("--cg-iters", type=data.pos_int, default=30, help="CG iterations at most, for d* "
                   "and for each block of d_LW (default 30)")
    p.add_argument("--tol", type=data.pos_float, default=1e-2, help="CG's target relative residual "
                   "|(G + lam I) x + g| / |g| (default 1e-2; the residual reached is reported)")
    p.add_argument("--out", default=None, help="output directory (default RESULTS/oracle)")
    p.add_argument("--cache-dir", default=None, help="token cache directory (default $FULLGN_CACHE "
                   "or ~/.cache/full-gn)")
    a = p.parse_args(argv)
    try:
        a.points = [int(s) for s in a.points.split(",")]
        a.lams = [float(s) for s in a.lams.split(",")]
    except ValueError:
        raise data.UserError("--points takes integers and --lams numbers, comma-separated") from None
    if min(a.points) < 0 or min(a.lams) <= 0:
        raise data.UserError("--points must be >= 0 and --lams > 0")
    for need in ("start/ckpt", "fig1/gn_full/config.json") + tuple(f"fig1/{m}/config.json" for m in METHODS):
        if not os.path.exists(os.path.join(a.results, need)):
            raise data.UserError(f"{a.results} has no {need}: run ./run.sh quick {a.results} first")
    a.out = a.out or os.path.join(a.results, "oracle")
    return a


# ============================================================================ maths

tdot, axpy = model.tdot, model.axpy
zeros = lambda t: jax.tree.map(jnp.zeros_like, t)


def delta(gu, uAu):
    """Delta(u) from g^T u and u^T (G + lam I) u: the damped GN model's decrease at u's best scale."""
    return jnp.where(gu < 0, gu ** 2 / (2 * jnp.maximum(uAu, 1e-30)), 0.0)


def embed(theta, keys, u_k):
    """The full-size vector that is u_k on block k and zero elsewhere."""
    return gn_layerwise.set_block(zeros(theta), keys, u_k)


def measure(theta, batch, lam, dirs, cfg, blocks, iters, tol):
    """f, f_k and cos_k of each direction in `dirs` (name -> pytree like theta), and of d_LW (as
    "layerwise"), at theta on a batch of (K, B, T) micro-batches; d* and each block of d_LW are
    solved by CG. Returns {"delta_star": Delta(d*), "residual", "iters", "block_residual",
    "dirs": {name: {"f", "f_k", "cos_k"}}}."""
    _, g, Gv = gn_full.gn_model(theta, batch, cfg)
    A = lambda v: axpy(lam, v, Gv(v))
    solve = lambda op, b: gn_full.cg(op, jax.tree.map(jnp.negative, b), zeros(b), iters, tol, eps=0.0)
    d_star, info = solve(A, g)
    get = gn_layerwise.get_block
    A_k = [lambda v, keys=keys: get(A(embed(theta, keys, v)), keys) for keys in blocks]  # G_kk + lam I
    lw = [solve(A_k[k], get(g, keys)) for k, keys in enumerate(blocks)]
    d_lw = zeros(theta)
    for keys, (x, _) in zip(blocks, lw):
        d_lw = gn_layerwise.set_block(d_lw, keys, x)
    ref = delta(tdot(g, d_star), tdot(d_star, A(d_star)))
    ref_k = [delta(tdot(get(g, keys), x), tdot(x, A_k[k](x)))
             for k, (keys, (x, _)) in enumerate(zip(blocks, lw))]

    def stats(u):                  # one direction: f, f_k, cos_k (lax.map: compiled once)
        f_k, cos_k = [], []
        for k, keys in enumerate(blocks):
            u_k, s_k = get(u, keys), get(d_star, keys)
            f_k.append(delta(tdot(get(g, keys), u_k), tdot(u_k, A_k[k](u_k))) / ref_k[k])
            cos_k.append(tdot(u_k, s_k) / jnp.sqrt(jnp.maximum(tdot(u_k, u_k) * tdot(s_k, s_k), 1e-30)))
        return delta(tdot(g, u), tdot(u, A(u))) / ref, jnp.stack(f_k), jnp.stack(cos_k)
    names = list(dirs) + ["layerwise"]
    f, f_k, cos_k = jax.lax.map(stats, jax.tree.map(lambda *xs: jnp.stack(xs), *dirs.values(), d_lw))
    out = {n: {"f": f[i], "f_k": f_k[i], "cos_k": cos_k[i]} for i, n in enumerate(names)}
    return {"delta_star": ref, "residual": info["residual"], "iters": info["iters"],
            "block_residual": jnp.stack([i["residual"] for _, i in lw]), "dirs": out}


# ============================================================================ the directions


def run_args(results, name):
    conf = json.load(open(os.path.join(results, "fig1", name, "config.json")))
    return argparse.Namespace(**conf["args"])


def method_state(results, m, point, params0):
    """(params, optimizer, optimizer state) of baseline m at step `point` of its Figure-1 run."""
    args = run_args(results, m)
    cfg = data.model_config(args)
    opt = METHODS[m].make_optimizer(args, params0)[0]
    template = METHODS[m].init_state(args, cfg, params0)
    if point == 0:
        return params0, opt, template["opt"]
    lr = args.lr
    dirs = [os.path.join(results, "fig1", m)] + glob.glob(os.path.join(results, "sweep", f"{m}_*"))
    for d in dirs:
        ck = os.path.join(d, "ckpt")
        if not os.path.exists(ck) or json.load(open(os.path.join(d, "config.json")))["args"]["lr"] != lr:
            continue
        for path in (ck, ck + ".prev"):
            if os.path.exists(path):
                state, meta = data.load_checkpoint(path, template)
                if meta["step"] == point:
                    return state["params"], opt, state["opt"]
    raise data.UserError(f"no checkpoint of {m} at step {point} in {results}/fig1/{m} or its sweep "
                         "run; choose --points among the steps that were checkpointed")


def next_update(opt, opt_state, params, g):
    u, st = opt.update(g, opt_state, params)
    if any(x.ndim == 2 and float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u)):
        u = opt.update(g, st, params)[0]            # SOAP's set-up call: its matrices got u = 0
    return u


def make_gn_inner(results, cfg, params):
    """theta, batch -> d = theta-hat - theta: one outer step of gn_full.py's inner solver with
    Figure 1's settings, from theta with a fresh optimizer state, its N inner steps cycling over
    the K micro-batches of the measured batch (so that d solves the same model as d*)."""
    args = argparse.Namespace(**dict(vars(run_args(results, "gn_full")), ls_batches=0))  # eta = 1
    step = gn_full.make_step(args, cfg)

    def direction(theta, batch):
        idx = jnp.arange(args.inner_steps) % batch["inputs"].shape[0]
        new, _ = step(gn_full.init_state(args, cfg, theta), jax.tree.map(lambda a: a[idx], batch), 0)
        return axpy(-1.0, theta, new["inner"])
    return direction


# ============================================================================ the loop

def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    args0 = run_args(a.results, "gn_full")
    cfg = data.model_config(args0)
    blocks = gn_layerwise.make_blocks(cfg)
    names = ["wte"] + [f"h[{i}]" for i in range(cfg.n_layers - 1)] + [f"h[{cfg.n_layers - 1}]+ln_f", "lm_head"]
    shape = model.init_params(cfg, jax.random.key(0))
    params0 = data.load_checkpoint(os.path.join(a.results, "start", "ckpt"), {"params": shape},
                                   keys=["params"])[0]["params"]
    tokens = data.load_tokens(args0.data, "train", cfg.vocab, a.cache_dir)
    batch_of = lambda j: jax.tree.map(jnp.asarray, data.Batches(
        tokens, args0.batch_size, cfg.seq_len, "random", 10_000 + j).take(0, a.micro_batches))
    meas = jax.jit(lambda th, b, lam, dirs: measure(th, b, lam, dirs, cfg, blocks, a.cg_iters, a.tol))
    grad = jax.jit(lambda th, b: model.mean_loss_and_grad(th, b, cfg)[1])
    gn_inner = make_gn_inner(a.results, cfg, params0)
    rows, t0 = [], time.time()
    for point in a.points:
        at = {m: method_state(a.results, m, point, params0) for m in METHODS}
        # at the shared start every method sits at the same theta: measure once, all directions
        groups = [("start", list(METHODS))] if point == 0 else [(m, [m]) for m in METHODS]
        for where, ms in groups:
            theta = at[ms[0]][0]
            for j in range(a.batches):
                b = batch_of(j)
                g = grad(theta, b)
                dirs = {m: next_update(at[m][1], at[m][2], theta, g) for m in ms}
                dirs["gn_inner"] = gn_inner(theta, b)
                for lam in a.lams:
                    r = jax.device_get(meas(theta, b, jnp.float32(lam), dirs))
                    row = {"point": point, "theta": where, "batch": j, "lam": lam, "K": a.micro_batches,
                           "tokens": int(b["targets"].size), "delta_star": float(r["delta_star"]),
                           "residual": float(r["residual"]), "cg_iters": int(r["iters"]),
                           "block_residual": [float(x) for x in r["block_residual"]],
                           "blocks": names,
                           "dirs": {n: {"f": float(v["f"]), "f_k": [float(x) for x in v["f_k"]],
                                        "cos_k": [float(x) for x in v["cos_k"]]} for n, v in r["dirs"].items()}}
                    rows.append(row)
                    print(f"point {point} theta {where} batch {j} lam {lam:g}: residual {row['residual']:.2e}, "
                          + ", ".join(f"f({n}) {v['f']:.3f}" for n, v in row["dirs"].items())
                          + f"  [{time.time() - t0:.0f}s]", flush=True)
    with open(os.path.join(a.out, "oracle.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report(rows, a.out)
    print(f"done: {len(rows)} measurements in {time.time() - t0:.0f}s -> {a.out}")


def report(rows, out):
    """oracle.md and oracle.png from the rows: mean over batches, with the range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["point"], r["theta"], r["lam"]) for r in rows}, key=lambda k: (k[2], k[0], k[1]))
    names = rows[0]["blocks"]
    span = lambda xs: f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"
    md = [f"K = {rows[0]['K']} micro-batch(es) of {rows[0]['tokens'] // rows[0]['K']:,} tokens per batch; "
          f"{len({r['batch'] for r in rows})} independent batches: mean [min, max] over them. CG "
          f"residuals of d* reached: {min(r['residual'] for r in rows):.1e} to "
          f"{max(r['residual'] for r in rows):.1e}; of the d_LW blocks: "
          f"{min(min(r['block_residual']) for r in rows):.1e} to {max(max(r['block_residual']) for r in rows):.1e}.",
          "", "| lam | point | theta | direction | f(u) | " + " | ".join(f"f_k {n}" for n in names)
          + " | " + " | ".join(f"cos_k {n}" for n in names) + " |",
          "|" + "---|" * (4 + 2 * len(names) + 1)]
    lams = sorted({k[2] for k in keys})
    fig, axes = plt.subplots(len(lams), len({k[:2] for k in keys}), figsize=(4.2 * len({k[:2] for k in keys}),
                             3.6 * len(lams)), squeeze=False)
    for (point, where, lam) in keys:
        sel = [r for r in rows if (r["point"], r["theta"], r["lam"]) == (point, where, lam)]
        ax = axes[lams.index(lam)][sorted({k[:2] for k in keys}).index((point, where))]
        dirs = list(sel[0]["dirs"])
        for i, n in enumerate(dirs):
            f = [r["dirs"][n]["f"] for r in sel]
            fk = np.array([r["dirs"][n]["f_k"] for r in sel])
            ck = np.array([r["dirs"][n]["cos_k"] for r in sel])
            md.append(f"| {lam:g} | {point} | {where} | {n} | {span(f)} | "
                      + " | ".join(span(fk[:, k]) for k in range(len(names))) + " | "
                      + " | ".join(f"{ck[:, k].mean():.2f}" for k in range(len(names))) + " |")
            x = np.arange(len(names) + 1) + (i - len(dirs) / 2) * 0.8 / len(dirs)
            y = np.concatenate([fk.mean(0), [np.mean(f)]])
            lo = y - np.concatenate([fk.min(0), [min(f)]])
            hi = np.concatenate([fk.max(0), [max(f)]]) - y
            ax.bar(x, y, 0.8 / len(dirs), yerr=[lo, hi], label=n, capsize=2)
        ax.set_xticks(range(len(names) + 1), names + ["all: f(u)"], rotation=45, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"step {point} ({where}), lam {lam:g}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("fraction of the oracle's decrease")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Oracle gap: f_k(u_k) per block, against the layerwise oracle,\nand f(u) (last bars), "
                 "against full GN d*; mean and range over batches", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "oracle.png"), dpi=110)
    plt.close(fig)
    open(os.path.join(out, "oracle.md"), "w").write("\n".join(md) + "\n")


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
