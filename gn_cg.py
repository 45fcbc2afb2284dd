"""Hessian-free Gauss-Newton (Martens 2010; Martens & Sutskever 2012): CG on the GN model, this
project's addition beside the paper's Algorithm 1 (gn_full.py), with the same line search.

GN split (the paper's setup): logits z = f(theta; x) = model.forward, loss l = mean token CE,
J = dz/dtheta, H = d2l/dz2 (model.ce_hvp_logits). One outer step at theta_t reads N outer
micro-batches x_1..x_N (--outer-batches) and n_ls fresh ones for the line search:
    g      = (1/N) sum_k J_k^T dl/dz_k                  the gradient on the whole outer batch
    G v    = (1/Kc) sum_{k <= Kc} J_k^T H_k J_k v        G on the first Kc (--curvature-batches),
                                                         from one jax.linearize, never materialised
    delta  = CG on (G + lam I) delta = -g from 0.95 delta_{t-1}      Martens 2010 §4.5 (warm start)
             stopped by Martens' relative progress rule (§4.4), |r| <= 1e-6 |g| or --cg-iters
    d      = delta, or the earlier stored CG iterate with the lowest loss on the fresh
             micro-batches, walking back while it falls                    §4.6 (backtracking)
    eta*   = the GN family's line search on the same micro-batches (model.line_search)
    theta_{t+1} = theta_t + eta* d;  the next CG starts from 0.95 delta, CG's own last iterate.
Damping lam: fixed (--lam), or Levenberg-Marquardt (§4.1, --lam-rule lm) on rho = (L(theta_t +
delta) - L(theta_t)) / (q(delta) - q(0)), q the undamped GN model: x3/2 below 1/4, x2/3 above 3/4.
A step that no eta > 0 improves (eta = 0 is evaluated too) is rejected: theta stays, CG restarts
from 0 with twice the damping (--no-reject: the best eta > 0 all the same).

The authors' code has no CG; the GN-family pieces it shares with gn_full.py (the line search,
the EMA, the metrics) are theirs, with gn_full.py's listed differences. Metrics: train_loss and
grad_norm of g on the outer batch, eta, lam, rho, cg_iters, cg_residual |r|/|g|, phi (CG's
quadratic at delta), step_norm |eta* d|, ls_loss, ls_loss_eta0, rejected, the passes.
"""
import math
import sys

import jax
import jax.numpy as jnp
import optax

import data
import model
from model import axpy, tdot

# ============================================================================ config

DEFAULTS = {  # flag: (value, or {size: value}; sources of the 45m and 150m values: data.SOURCES)
    "grad_accum": None,                                  # the outer batch is --outer-batches
    "lr": None,                                          # no lr: CG's step is the solve's own
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("G", "G")),
    "steps": ({"tiny": 4, "small": 10, "45m": 227, "150m": 100}, ("G", "O")),
    "eval_every": ({"tiny": 2, "small": 1, "45m": 10, "150m": 1}, ("G", "G")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    f = p.flag
    f("--outer-batches", {"tiny": 2, "small": 8, "45m": 122, "150m": 1831},
      "N: micro-batches of the outer batch, on which g is taken", src=("G", "G"), type=data.pos_int)
    data.gn_flags(p, inner=False)
    f("--cg-iters", {"tiny": 5, "small": 10, "45m": 50, "150m": 50},
      "maximum CG iterations", type=data.pos_int)
    f("--lam", 0.01, "damping lambda (its initial value under lm)", type=data.pos_float)
    f("--lam-rule", "fixed", "lambda adaptation: fixed (measured best: docs/running.md), or lm "
      "(Levenberg-Marquardt on rho: x3/2 below 1/4, x2/3 above 3/4)", choices=["fixed", "lm"])
    f("--curvature-batches", {"tiny": 0, "small": 2, "45m": 1, "150m": 1},
      "Kc: micro-batches of the outer batch used for G (0: all); G's "
      "linearisation keeps all their residuals in memory", type=data.nonneg_int)
    args = data.parse_common(p, argv, "gn_cg")
    if args.curvature_batches > args.outer_batches:
        raise data.UserError("--curvature-batches cannot exceed --outer-batches")
    if args.ls_batches == 0:
        raise data.UserError("gn_cg.py needs --ls-batches >= 1 (rho and backtracking use them)")
    return args


# ============================================================================ maths

def gn_model(params, batch, cfg, n_chunks=1):
    """Linearise f once at params on a batch of (B, T) or stacked (K, B, T) micro-batches.
    Returns loss l(z0), the gradient g = J^T dl/dz, and v -> G v reusing the linearisation.
    n_chunks > 1 bounds memory instead: the linearisation of every micro-batch's residuals is not
    kept but recomputed chunk by chunk (`n_chunks` chunks of rows) inside each product, one more
    forward pass per micro-batch and product."""
    x, y = batch["inputs"], batch["targets"]
    if x.ndim == 2:
        x, y = x[None], y[None]
    n_tok = y.size
    # XLA on CPU (jax 0.10.2) miscompiles model.attention's JVP under jit when the tangent is a
    # compile-time constant (CG's x0 = 0, a block embedded in zeros): inf, nan or garbage from run
    # to run. The barrier keeps every v a runtime value.
    bar = jax.lax.optimization_barrier
    if n_chunks > 1:
        loss, g = model.mean_loss_and_grad(params, {"inputs": x, "targets": y}, cfg, n_chunks)
        xs, ys = model.chunk_micro(x, n_chunks), model.chunk_micro(y, n_chunks)

        def Gv(v):
            v = bar(v)

            def chunk(acc, xy):
                z0, jvp = jax.linearize(lambda p: model.forward(p, xy[0], cfg), params)
                w = model.ce_hvp_logits(jax.nn.softmax(z0, -1), jvp(v), n_tok)
                return axpy(1.0, jax.linear_transpose(jvp, params)(w)[0], acc), None
            return jax.lax.scan(chunk, jax.tree.map(jnp.zeros_like, v), (xs, ys))[0]
        return loss, g, Gv
    f = lambda p: jax.lax.map(lambda xk: model.forward(p, xk, cfg), x)
    z0, jvp = jax.linearize(f, params)                     # z0: (K, B, T, V)
    vjp = jax.linear_transpose(jvp, params)
    p0 = jax.nn.softmax(z0, -1)                             # once, outside every product
    g = vjp(model.ce_grad_logits(p0, y, n_tok))[0]
    Gv = lambda v: vjp(model.ce_hvp_logits(p0, jvp(bar(v)), n_tok))[0]
    return model.cross_entropy(z0, y), g, Gv


def cg(matvec, b, x0, max_iters=50, tol=1e-6, eps=5e-4, store_at=()):
    """Solve A x = b (A SPD) by conjugate gradient, as a lax.while_loop.

    Tracks phi(x) = 1/2 x^T A x - b^T x = -1/2 (b + r)^T x with r = b - A x (no extra product).
    Stops on Martens' relative progress (i > k, phi_i < 0, (phi_i - phi_{i-k}) / phi_i < k eps,
    k = max(10, 0.1 i)), on |r| <= tol |b|, at max_iters, on p^T A p <= 0, or on a non-finite
    value (keeping the last finite iterate). Iterates at the iterations in store_at are kept.
    Returns x and info: iters, residual |r|/|b|, phi (history), stash (the stored iterates)."""
    store_at = tuple(store_at)
    slot = jnp.array([store_at.index(i) if i in store_at else -1 for i in range(max_iters + 1)])
    r0 = axpy(-1.0, matvec(x0), b)
    phi = lambda x, r: -0.5 * tdot(axpy(1.0, b, r), x)
    bb = tdot(b, b)
    stash = jax.tree.map(lambda x: jnp.zeros((max(len(store_at), 1),) + x.shape, x.dtype), x0)
    hist = jnp.zeros(max_iters + 1).at[0].set(phi(x0, r0))
    init = dict(i=0, x=x0, r=r0, p=r0, rr=tdot(r0, r0), hist=hist, stash=stash, stop=False)

    def body(s):
        Ap = matvec(s["p"])
        pAp = tdot(s["p"], Ap)
        alpha = s["rr"] / pAp
        x, r = axpy(alpha, s["p"], s["x"]), axpy(-alpha, Ap, s["r"])
        rr = tdot(r, r)
        i = s["i"] + 1
        ph = phi(x, r)
        bad = (pAp <= 0) | ~jnp.isfinite(ph) | ~jnp.isfinite(rr)
        x, r, rr = [jax.tree.map(lambda new, old: jnp.where(bad, old, new), n, o)
                    for n, o in ((x, s["x"]), (r, s["r"]), (rr, s["rr"]))]
        hist = s["hist"].at[i].set(jnp.where(bad, s["hist"][i - 1], ph))
        k = jnp.maximum(10, (0.1 * i).astype(jnp.int32))
        slow = (i > k) & (hist[i] < 0) & ((hist[i] - hist[jnp.maximum(i - k, 0)]) / hist[i] < k * eps)
        j = jnp.maximum(slot[i], 0)   # writes one slot; a no-op write when i is not stored
        stash = jax.tree.map(lambda st, xi: st.at[j].set(jnp.where(slot[i] >= 0, xi, st[j])),
                             s["stash"], x)
        p = axpy(rr / s["rr"], s["p"], r)
        stop = bad | slow | (rr <= tol ** 2 * bb)
        return dict(i=i, x=x, r=r, p=p, rr=rr, hist=hist, stash=stash, stop=stop)

    s = jax.lax.while_loop(lambda s: (s["i"] < max_iters) & ~s["stop"], body, init)
    return s["x"], dict(iters=s["i"], residual=jnp.sqrt(s["rr"] / bb), phi=s["hist"], stash=s["stash"])


def backtrack(f, delta, stash, n_stored):
    """Martens 2010 §4.6: start from the last CG iterate delta and walk back over the stored ones
    (stash[n_stored-1], ..., stash[0]) while the loss f keeps falling; the walk stops at the first
    iterate that does not improve. Returns the best iterate, its loss and the iterates evaluated."""
    cand = lambda j: jax.tree.map(lambda st: st[j], stash)

    def back(c):
        j, best, f_best, _ = c
        x = cand(j)
        f_j = f(x)
        better = f_j < f_best
        return (j - 1, jax.tree.map(lambda a, b: jnp.where(better, a, b), x, best),
                jnp.minimum(f_j, f_best), better)
    f_full = f(delta)
    j_end, d, f_d, _ = jax.lax.while_loop(lambda c: (c[0] >= 0) & c[3], back,
                                          (n_stored - 1, delta, f_full, True))
    return d, f_d, f_full, n_stored - 1 - j_end


def lm_damping(lam, rho, lo=0.25, hi=0.75):
    """Levenberg-Marquardt (Martens 2010 §4.1): a model that over-predicts the decrease (rho < lo)
    gets more damping, x3/2; one that predicts well (rho > hi) gets less, x2/3."""
    return jnp.where(rho < lo, lam * 1.5, jnp.where(rho > hi, lam * 2 / 3, lam))


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg):
    """One outer step: g on the outer batch, CG on (G + lam I) delta = -g, backtracking, the line
    search, the damping's update."""
    N, Kc = args.outer_batches, args.curvature_batches or args.outer_batches
    store_at = sorted({math.ceil(1.3 ** j) for j in range(40) if math.ceil(1.3 ** j) <= args.cg_iters})
    ls_tick = data.ticker(args, "line-search eta")

    def step(state, batches, s):
        theta, lam = state["params"], state["lam"]
        outer, ls = model.inner_and_ls_batches(batches, N)
        if Kc < N:   # g on the whole outer batch, G on its first Kc micro-batches
            loss, g = model.mean_loss_and_grad(theta, outer, cfg, args.split)
            Gv = gn_model(theta, jax.tree.map(lambda a: a[:Kc], outer), cfg, args.split)[2]
        else:        # one linearisation serves g and G
            loss, g, Gv = gn_model(theta, outer, cfg, args.split)
        A = lambda v: axpy(lam, v, Gv(v))
        if args.fsdp:   # keep g and the CG vectors split like the params, not replicated
            shard = lambda t: jax.lax.with_sharding_constraint(
                t, data.state_sharding(t, data.make_mesh(), True))
            g, A = shard(g), (lambda v: shard(axpy(lam, v, Gv(v))))
        x0 = jax.tree.map(lambda a: 0.95 * a, state["delta"])             # Martens' warm start
        delta, info = cg(A, jax.tree.map(jnp.negative, g), x0, args.cg_iters, store_at=store_at)
        gd, dd = tdot(g, delta), tdot(delta, delta)
        dGd = 2 * (info["phi"][info["iters"]] - gd) - lam * dd               # from phi, no product
        f = lambda x: jnp.mean(jax.lax.map(
            lambda b: model.mean_loss(axpy(1.0, x, theta), b, cfg, args.split), ls))
        n_st = jnp.sum(jnp.array(store_at) < info["iters"])
        d, _, f_full, n_back = backtrack(f, delta, info["stash"], n_st)
        eta, rejected, m = model.line_search(theta, d, ls, cfg, args.ls_range, args.split,
                                             not args.no_reject, ls_tick)
        rho = (f_full - m["ls_loss_eta0"]) / (gd + 0.5 * dGd)     # against the undamped GN model
        new_lam = lm_damping(lam, rho) if args.lam_rule == "lm" else lam
        # a rejected step: theta stays, CG restarts from 0 with twice the damping
        new = {"params": axpy(eta, d, theta), "lam": jnp.where(rejected, 2 * lam, new_lam),
               "delta": jax.tree.map(lambda a: jnp.where(rejected, 0.0, a), delta)}
        m |= {"train_loss": loss, "grad_norm": optax.tree.norm(g), "eta": eta,
              "lam": lam, "rho": rho, "cg_iters": info["iters"], "cg_residual": info["residual"],
              "phi": info["phi"][info["iters"]], "step_norm": eta * optax.tree.norm(d)}
        n_ls_fwd = (args.ls_range + 2 + n_back) * len(ls["inputs"])       # grid + f(0), f(delta), back
        grad_passes = N if Kc < N else 0
        products = info["iters"]                                          # G v products
        # forward passes: the stored linearisation of the Kc curvature batches (none with
        # --split > 1 when Kc < N: gn_model's loss and gradient, unused then, are not computed),
        # the gradient, the line search, and with --split > 1 one re-linearisation per product
        lin = 0 if args.split > 1 and Kc < N else Kc
        refwd = products * Kc if args.split > 1 else 0
        return model.finish_gn_step(args, cfg, state, new, m, fwd=lin + grad_passes + n_ls_fwd + refwd,
                                    jvp=products * Kc, vjp=(grad_passes or Kc) + products * Kc, trained=outer)
    return step


# ============================================================================ loop

def init_state(args, cfg, params):
    """theta_t, lambda and CG's warm start delta."""
    state = {"params": params, "lam": jnp.float32(args.lam), "delta": jax.tree.map(jnp.zeros_like, params)}
    return state | ({"ema": params} if args.ema else {})


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    if args.split > 1:
        run.log(f"--split {args.split}: each G v product re-linearises the curvature batches chunk "
                "by chunk (one more forward per product; memory of one chunk)")
    run.train(init_state(args, cfg, params), make_step(args, cfg))


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
