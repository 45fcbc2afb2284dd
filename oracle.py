"""The oracle gap, and the exactness of GN's inner solve, on the batch each step actually uses.

The paper concludes (its Section 6) that "a significant performance gap exists between current
approximate methods and an idealized layerwise oracle", from iteration counts. This tool measures
the gap, and how exactly Algorithm 1's inner solve minimises its model, at points of the runs
themselves. At the parameters theta_t of a run after t steps, the model is that of the step's own
batch: the first K micro-batches of the outer batch its next step reads (GN: of its N inner
micro-batches), g = mean_k grad l_k and G = mean_k J_k^T H_k J_k over those K (gn_cg.gn_model),
and a damping lam:

    q(u)     = g^T u + 1/2 u^T G u          the undamped GN model: what the inner solve minimises
    d*       = -(G + lam I)^-1 g            the damped reference solve (CG to relative residual --tol)
    Delta(u) = (g^T u)^2 / (2 u^T (G + lam I) u)   if g^T u < 0, else 0
             = the damped model's decrease at u's best scale (a method's lr only scales u)
    f(u)     = Delta(u) / Delta(d*)         in [0, 1]; f(d*) = 1 (Cauchy-Schwarz in the G + lam I norm)
    e(u)     = q(u) / q(d*)                 exactness: the model decrease of u as taken, at its own
                                            scale, over the reference solve's (d* is damped: e > 1
                                            is possible; e < 0: u increases the model)

Per block k (the L + 2 blocks of gn_layerwise.py: wte, each transformer block, lm_head), f_k(u_k)
uses g_k and the diagonal block G_kk against d_LW,k = -(G_kk + lam I)^-1 g_k, the layerwise oracle
(f_k = 1 by definition); cos_k is the cosine of u_k and d*_k. The directions u at a point:
    adamw, muon, soap,  the step the run takes from theta_t: its step function from its own
    kfac                optimizer state on its own batch (SOAP's first step only builds its
                        preconditioner, u = 0: it is measured from its second step on)
    gn_full             the direction Algorithm 1 takes: d = theta_hat - theta_t from its run's
                        warm-started inner iterate and optimizer state, on its N inner micro-batches,
                        before the line search scales it
    layerwise           d_LW: f(d_LW) is what the block-diagonal preconditioner loses by ignoring
                        the curvature across blocks

Each run (RESULTS/fig1/<method>: gn_full and the baselines there) is replayed from the shared start RESULTS/start/ckpt with its own
config.json and the batches it read (data.Batches at its positions); every replayed step's
train_loss is checked against the run's metrics.jsonl to REPLAY_RTOL: replays of SOAP leave its
logged losses by ~1e-3 within 8 steps (its eigenbases, from eigh of near-degenerate statistics,
differ between runs of the same code on CPU), so a point is a state the run reaches up to that
noise; each row records the largest deviation before it (replay_dev). At point 0 every run
sits at the start and reads the same first micro-batches: one measurement takes every method's first step.

    python oracle.py --results results/quick [--points 0,1,8] [--gn-points 0,1,2] [--lams 3e-2,1e-1]

Writes OUT/oracle.jsonl (every number), OUT/oracle.md (tables) and OUT/oracle.png.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import adamw
import data
import gn_cg
import gn_full
import gn_layerwise
import kfac
import model
import muon
import soap

METHODS = {"adamw": adamw, "muon": muon, "soap": soap, "kfac": kfac, "gn_full": gn_full}

# ============================================================================ config


def ints(s):
    return [int(x) for x in s.split(",")] if s else []


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--results", required=True, help="a results directory of run.sh quick (start/, fig1/)")
    p.add_argument("--points", default="0,8", help="steps t of the baselines' Figure-1 runs to measure "
                   "at, comma-separated (0: the shared start) (default 0,8)")
    p.add_argument("--gn-points", default=None, help="steps t of GN full's Figure-1 run (default: "
                   "every step it took)")
    p.add_argument("--lams", default="3e-2,1e-1", help="damping values lam, comma-separated "
                   "(default 3e-2,1e-1)")
    p.add_argument("--micro-batches", type=data.pos_int, default=8, help="K: micro-batches of the "
                   "step's own batch that define g and G (default 8)")
    p.add_argument("--batches", type=data.pos_int, default=1, help="disjoint sets of K micro-batches "
                   "of the step's batch (set j: micro-batches jK .. jK+K-1), for the spread (default 1)")
    p.add_argument("--blocks", default="0", help="steps at which d_LW and the per-block f_k and cos_k "
                   "are measured too, comma-separated (each costs L + 2 more CG solves) (default 0)")
    p.add_argument("--cg-iters", type=data.pos_int, default=30, help="CG iterations at most, for d* "
                   "and for each block of d_LW (default 30)")
    p.add_argument("--tol", type=data.pos_float, default=1e-2, help="CG's target relative residual "
                   "|(G + lam I) x + g| / |g| (default 1e-2; the residual reached is reported)")
    p.add_argument("--out", default=None, help="output directory (default RESULTS/oracle)")
    p.add_argument("--cache-dir", default=None, help="token cache directory (default $FULLGN_CACHE "
                   "or ~/.cache/full-gn)")
    a = p.parse_args(argv)
    try:
        a.points, a.blocks, a.lams = ints(a.points), ints(a.blocks), [float(s) for s in a.lams.split(",")]
        a.gn_points = None if a.gn_points is None else ints(a.gn_points)
    except ValueError:
        raise data.UserError("--points and --gn-points take integers and --lams numbers, "
                             "comma-separated") from None
    if min(a.points + (a.gn_points or []) + [0]) < 0 or min(a.lams) <= 0:
        raise data.UserError("--points and --gn-points must be >= 0 and --lams > 0")
    for need in ("start/ckpt", "fig1/gn_full/metrics.jsonl"):
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


def measure(theta, batch, lam, dirs, cfg, blocks, iters, tol, n_chunks=1):
    """f, e, f_k and cos_k of each direction in `dirs` (name -> pytree like theta), and of d_LW (as
    "layerwise"), at theta on the GN model of all K stacked micro-batches (K, B, T) of `batch`; d*
    and each block of d_LW are solved by CG. blocks = []: f and e only, no d_LW (1/7 of the cost).
    n_chunks > 1: each product re-linearises the micro-batches chunk by chunk (gn_cg.gn_model), in
    the memory of one chunk. Returns {"delta_star": Delta(d*), "q_star": q(d*), "residual", "iters",
    "dirs": {name: {"f", "e", "f_k", "cos_k"}}} and, with blocks, "block_residual"."""
    _, g, Gv = gn_cg.gn_model(theta, batch, cfg, n_chunks)
    A = lambda v: axpy(lam, v, Gv(v))
    solve = lambda op, b: gn_cg.cg(op, jax.tree.map(jnp.negative, b), zeros(b), iters, tol, eps=0.0)
    d_star, info = solve(A, g)
    # block k as a 0/1 mask M_k over every parameter: G_kk + lam I acts as M_k A M_k, and the L + 2
    # blocks' solves and products run as one vmapped program (a block's own program each would
    # compile L + 2 copies of the GGN-vector product), holding L + 2 full-size CG states at once
    ones = lambda keys: jax.tree.map(jnp.ones_like, gn_layerwise.get_block(theta, keys))
    masks = [embed(theta, keys, ones(keys)) for keys in blocks]
    M = jax.tree.map(lambda *m: jnp.stack(m), *masks) if blocks else None        # (L + 2, ...) per leaf
    on = lambda m, v: jax.tree.map(jnp.multiply, m, v)                            # v_k, zero off block k
    A_k = lambda m, v: on(m, A(on(m, v)))
    if blocks:
        x_lw, info_lw = jax.vmap(lambda m: solve(lambda v: A_k(m, v), on(m, g)))(M)    # d_LW,k, stacked
        d_lw = jax.tree.map(lambda x: x.sum(0), x_lw)
        ref_k = jax.vmap(lambda m, x: delta(tdot(on(m, g), x), tdot(x, A_k(m, x))))(M, x_lw)
    q = lambda gu, uAu, uu: gu + 0.5 * (uAu - lam * uu)                  # the undamped model
    gs, sAs = tdot(g, d_star), tdot(d_star, A(d_star))
    ref, q_star = delta(gs, sAs), q(gs, sAs, tdot(d_star, d_star))

    def per_block(m, u):           # f_k and cos_k of one direction on one block
        u_k, s_k = on(m, u), on(m, d_star)
        f = delta(tdot(on(m, g), u_k), tdot(u_k, A_k(m, u_k)))
        return f, tdot(u_k, s_k) / jnp.sqrt(jnp.maximum(tdot(u_k, u_k) * tdot(s_k, s_k), 1e-30))

    def stats(u):                  # one direction (lax.map: compiled once)
        gu, uAu = tdot(g, u), tdot(u, A(u))
        out = {"f": delta(gu, uAu) / ref, "e": q(gu, uAu, tdot(u, u)) / q_star}
        if blocks:
            f_k, cos_k = jax.vmap(per_block, in_axes=(0, None))(M, u)
            out |= {"f_k": f_k / ref_k, "cos_k": cos_k}
        return out
    names = list(dirs) + (["layerwise"] if blocks else [])
    res = jax.lax.map(stats, jax.tree.map(lambda *xs: jnp.stack(xs), *dirs.values(), *([d_lw] if blocks else [])))
    out = {"delta_star": ref, "q_star": q_star, "residual": info["residual"], "iters": info["iters"],
           "dirs": {n: jax.tree.map(lambda x: x[i], res) for i, n in enumerate(names)}}
    return out | ({"block_residual": info_lw["residual"]} if blocks else {})


def rename(r, names):
    """measure's result on directions u0, u1, ... under their names (layerwise keeps its own)."""
    return r | {"dirs": {({f"u{i}": n for i, n in enumerate(names)}.get(k, k)): v for k, v in r["dirs"].items()}}


def model_batch(step_batches, K, j):
    """Set j of the K micro-batches that define the point's model: micro-batches jK .. jK+K-1 of
    the step's own (n, B, T) batch (a GN step's first N are its inner ones)."""
    return jax.tree.map(lambda a: a[j * K:(j + 1) * K], step_batches)


# ============================================================================ the runs, replayed


def run_args(path):
    return argparse.Namespace(**json.load(open(os.path.join(path, "config.json")))["args"])


REPLAY_RTOL = 5e-3    # relative train_loss deviation a replay may reach (SOAP's: ~1e-3 at step 8)


def replay(path, name, upto, params0, tokens, log):
    """Run `name`'s run at `path` again from params0, for `upto` steps, with its config and its
    batches. Yields (t, state after t steps, the batches of step t + 1, the direction u that step
    takes); stops with a UserError when a replayed train_loss leaves the logged one."""
    args, mod = run_args(path), METHODS[name]
    cfg = data.model_config(args)
    logged = {r["step"]: r for r in map(json.loads, open(os.path.join(path, "metrics.jsonl")))}
    stream = data.Batches(tokens, args.batch_size, cfg.seq_len, args.order, args.seed)
    n, step = data.micro_per_step(args), jax.jit(mod.make_step(args, cfg))
    state, dev = mod.init_state(args, cfg, params0), 0.0
    for t in range(upto):
        if t + 1 not in logged:
            raise data.UserError(f"{path} logged no step {t + 1}; choose points below its last step")
        b = jax.tree.map(jnp.asarray, stream.take(t * n, n))
        new, m = step(state, b, t)
        got, want = float(m["train_loss"]), logged[t + 1]["train_loss"]
        dev = max(dev, abs(got - want) / abs(want))
        if dev > REPLAY_RTOL:
            raise data.UserError(f"replaying {path}: train_loss {got:.6f} at step {t + 1}, the run "
                                 f"logged {want:.6f}; was it run with other code?")
        u = axpy(-1.0, state["params"], new["theta_hat"] if name == "gn_full" else new["params"])
        if name == "gn_full" and float(m["eta"]) == 0:
            log(f"{name} step {t + 1} was rejected (its d is discarded): not measured")
            u = None
        yield t, state["params"], b, u, dev
        state = new


# ============================================================================ the loop

def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    gn_path = os.path.join(a.results, "fig1", "gn_full")
    args0 = run_args(gn_path)
    cfg = data.model_config(args0)
    blocks = gn_layerwise.make_blocks(cfg)
    names = ["wte"] + [f"h[{i}]" for i in range(cfg.n_layers - 1)] + [f"h[{cfg.n_layers - 1}]+ln_f", "lm_head"]
    shape = model.init_params(cfg, jax.random.key(0))
    params0 = data.load_checkpoint(os.path.join(a.results, "start", "ckpt"), {"params": shape},
                                   keys=["params"])[0]["params"]
    tokens = data.load_tokens(args0.data, "train", cfg.vocab, a.cache_dir)
    gn_steps = max(r["step"] for r in map(json.loads, open(os.path.join(gn_path, "metrics.jsonl"))))
    want = {m: a.points for m in ("adamw", "muon", "soap", "kfac")
            if os.path.exists(os.path.join(a.results, "fig1", m))}
    want["gn_full"] = list(range(gn_steps)) if a.gn_points is None else a.gn_points
    n_chunks = 2 if args0.batch_size % 2 == 0 else 1   # K stored linearisations would not fit at small
    # the directions go in as a list (names outside): one compilation per count, whatever the run
    jitted = {on: jax.jit(lambda th, b, lam, us, on=on: measure(
        th, b, lam, {f"u{i}": u for i, u in enumerate(us)}, cfg, blocks if on else [], a.cg_iters, a.tol, n_chunks))
        for on in (False, True)}
    meas = {on: (lambda th, b, lam, dirs, on=on: rename(jitted[on](th, b, lam, list(dirs.values())), list(dirs)))
            for on in (False, True)}
    t0, rows = time.time(), []
    at0 = {}                                   # point 0: every run's first step, measured together
    for m, pts in want.items():
        if not pts:
            continue
        path = os.path.join(a.results, "fig1", m)
        args = run_args(path)
        n_model = args.inner_steps if m == "gn_full" else data.micro_per_step(args)   # GN: its inner ones
        if n_model < a.micro_batches * a.batches:
            raise data.UserError(f"{m}'s steps have {n_model} micro-batches for the model, fewer than "
                                 f"--micro-batches x --batches = {a.micro_batches * a.batches}")
        for t, theta, b, u, dev in replay(path, m, max(pts) + 1, params0, tokens, print):
            if t not in pts or u is None or (m == "soap" and t == 0):
                continue
            sets = [model_batch(b, a.micro_batches, j) for j in range(a.batches)]
            if t == 0:
                at0[m] = (theta, sets, u)
                continue
            rows += measure_point(meas[t in a.blocks], m, t, theta, sets, {m: u}, a, names, t0, dev)
    if at0:
        (theta, sets, _), *others = at0.values()
        for _, s, _ in others:   # the same first micro-batches (same seed, order and batch size)
            if not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(sets, s)):
                raise data.UserError("the runs' first steps read different micro-batches: point 0 "
                                     "needs the same --seed, --order and --batch-size in every run")
        rows = measure_point(meas[0 in a.blocks], "start", 0, theta, sets, {m: v[2] for m, v in at0.items()},
                             a, names, t0) + rows
    with open(os.path.join(a.out, "oracle.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    report(rows, a.out)
    print(f"done: {len(rows)} measurements in {time.time() - t0:.0f}s -> {a.out}")


def measure_point(meas, where, t, theta, sets, dirs, a, names, t0, dev=0.0):
    rows = []
    for j, b in enumerate(sets):
        for lam in a.lams:
            r = jax.device_get(meas(theta, b, jnp.float32(lam), dirs))
            row = {"point": t, "theta": where, "batch": j, "lam": lam, "K": a.micro_batches,
                   "tokens": int(b["targets"].size), "delta_star": float(r["delta_star"]),
                   "q_star": float(r["q_star"]), "residual": float(r["residual"]),
                   "cg_iters": int(r["iters"]), "replay_dev": dev, "blocks": names}
            if "block_residual" in r:
                row["block_residual"] = [float(x) for x in r["block_residual"]]
            row["dirs"] = {n: {k: (float(x) if k in ("f", "e") else [float(y) for y in x]) for k, x in v.items()}
                           for n, v in r["dirs"].items()}
            rows.append(row)
            print(f"point {t} theta {where} set {j} lam {lam:g}: residual {row['residual']:.2e}, "
                  + ", ".join(f"f({n}) {v['f']:.3f} e {v['e']:.3f}" for n, v in row["dirs"].items())
                  + f"  [{time.time() - t0:.0f}s]", flush=True)
    return rows


def report(rows, out):
    """oracle.md (every measurement: mean [min, max] over the sets of micro-batches) and oracle.png
    (f and e of each run's own step along its run, per lam)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["lam"], r["point"], r["theta"]) for r in rows})
    names = rows[0]["blocks"]
    span = lambda xs: f"{np.mean(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]" if len(xs) > 1 else f"{xs[0]:.3f}"
    br = [x for r in rows for x in r.get("block_residual", [])]
    md = [f"K = {rows[0]['K']} micro-batches of {rows[0]['tokens'] // rows[0]['K']:,} tokens of each step's own "
          f"batch; {len({r['batch'] for r in rows})} disjoint set(s) of them (mean [min, max] over sets). CG "
          f"residuals of d* reached: {min(r['residual'] for r in rows):.1e} to {max(r['residual'] for r in rows):.1e}"
          + (f"; of the d_LW blocks: {min(br):.1e} to {max(br):.1e}" if br else "")
          + f". Replayed train losses within {max(r['replay_dev'] for r in rows):.1e} (relative) of the logged ones.",
          "", "| lam | step | run | direction | f(u) | e(u) | " + " | ".join(f"f_k {n}" for n in names)
          + " | " + " | ".join(f"cos_k {n}" for n in names) + " |",
          "|" + "---|" * (6 + 2 * len(names))]
    for lam, point, where in keys:
        sel = [r for r in rows if (r["lam"], r["point"], r["theta"]) == (lam, point, where)]
        for n in sel[0]["dirs"]:
            v = [r["dirs"][n] for r in sel]
            cells = [span([x["f"] for x in v]), span([x["e"] for x in v])]
            if "f_k" in v[0]:
                cells += [span([x["f_k"][k] for x in v]) for k in range(len(names))]
                cells += [f"{np.mean([x['cos_k'][k] for x in v]):.2f}" for k in range(len(names))]
            else:
                cells += ["-"] * (2 * len(names))
            md.append(f"| {lam:g} | {point} | {where} | {n} | " + " | ".join(cells) + " |")
    lams = sorted({r["lam"] for r in rows})
    fig, axes = plt.subplots(len(lams), 2, figsize=(10, 3.6 * len(lams)), squeeze=False)
    runs = sorted({n for r in rows for n in r["dirs"] if n != "layerwise"})
    for i, lam in enumerate(lams):
        for j, key in enumerate(("f", "e")):
            ax = axes[i][j]
            for n in runs:     # each run's own step at each of its points (point 0: the shared start)
                pts = sorted({r["point"] for r in rows if r["lam"] == lam and n in r["dirs"]})
                y = [np.mean([r["dirs"][n][key] for r in rows if r["lam"] == lam and r["point"] == p
                              and n in r["dirs"]]) for p in pts]
                ax.plot(pts, y, "o-", label=n)
            ax.set_xlabel("steps taken (the measured step is the next one)")
            ax.set_title(f"{'f(u): damped-model decrease at best scale' if key == 'f' else 'e(u) = q(u)/q(d*): as taken'}"
                         f", lam {lam:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if key == "f":
                ax.set_ylim(0, 1.05)
            else:
                ax.axhline(1, color="k", lw=0.8)
        axes[i][0].legend(fontsize=7)
    fig.suptitle(f"The step each run takes, on the GN model of its own batch (K = {rows[0]['K']} micro-batches)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "oracle.png"), dpi=110)
    plt.close(fig)
    open(os.path.join(out, "oracle.md"), "w").write("\n".join(md) + "\n")


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
