"""Full Gauss-Newton: the paper's Algorithm 1 (an inner solver on the GN model + line search),
and Hessian-free CG on the same model.

GN split (the paper's setup; Martens 2010): logits z = f(theta; x) = model.forward, loss l =
mean token CE. With J = dz/dtheta and H = d2l/dz2 (model.ce_hvp_logits), the Gauss-Newton
matrix over a batch is G = J^T H J, applied as G v = J^T H (J v) from one jax.linearize (J v)
and its linear_transpose (J^T w), never materialised.

--solver inner (Algorithm 1, the paper's method; the authors' llama_train_gn.py). At theta_t:
    q_k(D) = l(z0) + g0^T J D + 1/2 (J D)^T H0 (J D),   z0 = f(theta_t; x_k), D = theta - theta_t
    grad q_k(D) = J^T (g0 + H0 J D)                      one fwd + JVP + VJP per inner step
    N inner steps of Muon (AdamW on embedding, head, 1-D params) or AdamW on fresh batches x_k;
    d = theta - theta_t;  eta* = argmin_{eta in (1/sqrt2)^i, i < ls_range} L(theta_t + eta d)
    theta_{t+1} = theta_t + eta* d;  the inner iterate theta and the optimizer state carry over.
--solver cg (Hessian-free; Martens 2010 §4, Martens & Sutskever 2012; this project's addition):
    solve (G + lam I) delta = -g by CG from 0.95 delta_prev (Martens' stopping rule), g on the
    outer batch and G on --curvature-batches of it; backtrack over the stored CG iterates, then
    the same line search. Damping: fixed, or Levenberg-Marquardt on rho = (L(theta + delta) -
    L(theta)) / (q(delta) - q(0)), q the undamped GN model (README: which measured better).
The metrics each logs are listed in the README ("Metrics").

Differences from the authors' code (natalieabreu/full-gauss-newton, llama_train_gn.py):
  - the line search also evaluates eta = 0 on its batches; a step that no eta > 0 improves is
    rejected: theta stays, the next solve restarts from theta_t with a fresh optimizer state
    and half the inner lr (halved at each rejection, never raised again; CG: from delta = 0 with
    twice the damping). Theirs took the best eta > 0 whatever it did: from random init at 45m
    one outer step took the validation loss from 10.94 to 18.58. --no-reject restores theirs;
  - at 45m/150m the run starts from the paper's shared AdamW checkpoint, built in (--start);
  - the inner lr is applied outside the optimizer, from the global inner step s*N + k, so that
    --reset-start does not restart the schedule (theirs restarted it);
  - `cosine_with_global_schedule` is left out (off by one in theirs); warmup counts outer steps;
  - Muon's 1-D params go to the AdamW group rather than the Adam inside optax's muon;
  - the EMA is off by default (--ema): their 0.999 per outer step kept ~80% weight on the start;
    with --ema, evaluation reports the raw params (val_loss) and the EMA (val_loss_ema) both;
  - the logged train_loss is the true loss at theta_t, not the quadratic-model value;
  - resume restores the inner iterate, the optimizer state and the data position (theirs did not);
  - inner_loop_wd (Figure 1's run: 0.01) has no flag: in GN mode theirs adds lam R(theta) to the
    scalar loss on the logits, which is differentiated with respect to the logits only
    (train_step_gauss_newton), so it changed the logged quadratic-model loss and never the update;
    parameter_wd is declared and never read. optimizer_wd is --wd;
  - CG is not in their code; GPT-2 BPE and data.py's sources instead of C4 + T5 tokenizer.
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

DEFAULTS = {  # flag: (45m default, {size: preset}, sources of the 45m and 150m values: data.SOURCES)
    "grad_accum": None,                                  # the outer batch is --inner-steps
    "batch_size": (32, {"small": 32, "tiny": 8, "150m": 128}, ("T", "F")),
    "steps": (227, {"small": 10, "tiny": 4, "150m": 100}, ("T", "O")),    # 150m: the paper's 54 to 3.25
    "lr": (0.01, {"small": 3e-3, "tiny": 3e-3, "150m": 0.003}, ("T", "F")),
    "schedule": ("constant_with_inner_cosine", {"small": "constant", "tiny": "constant",
                                                "150m": "global_cosine"}, ("T", "F")),
    "schedules": ["constant_with_inner_cosine", "global_cosine", "constant"],
    "wd": (0.001, {"small": 0.0, "tiny": 0.0}, ("T", "F")),            # optimizer_wd
    "eval_every": (10, {"small": 1, "tiny": 2, "150m": 1}, ("T", "F")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    f = p.flag
    f("--solver", "inner", "inner: Algorithm 1 (inner optimizer on the GN model); cg: Hessian-free",
      choices=["inner", "cg"])
    data.gn_flags(p)
    f("--cg-iters", 50, "cg: maximum CG iterations", {"small": 10, "tiny": 5}, type=data.pos_int)
    f("--lam", 0.01, "cg: damping lambda (its initial value under lm)", type=data.pos_float)
    f("--lam-rule", "fixed", "cg: lambda adaptation: fixed (measured best, see the README), or lm "
      "(Levenberg-Marquardt on rho: x3/2 below 1/4, x2/3 above 3/4)", choices=["fixed", "lm"])
    f("--curvature-batches", 1, "cg: micro-batches of the outer batch used for G (0: all); G's "
      "linearisation keeps all their residuals in memory", {"small": 2, "tiny": 0},
      type=data.nonneg_int)
    p.add_argument("--model-change", action="store_true",
                   help="at evaluation steps, log model_change and model_change_d, the GN model's "
                        "predicted change of the loss for the step taken and for the unscaled d "
                        "(one forward + JVP per inner micro-batch, 28%% of a small step: a diagnostic)")
    args = data.parse_common(p, argv, "gn_full")
    if args.curvature_batches > args.inner_steps:
        raise data.UserError("--curvature-batches cannot exceed --inner-steps")
    if args.solver == "cg" and args.ls_batches == 0:
        raise data.UserError("--solver cg needs --ls-batches >= 1 (rho and backtracking use them)")
    return args


# ============================================================================ Algorithm 1

def quad_model_grad(theta_t, D, batch, cfg, split=1):
    """Algorithm 1's inner gradient on one micro-batch: grad q(D) = J^T (g0 + H0 J D), and l(z0).
    The micro-batch is processed in `split` equal chunks (means of means). Only model.hidden is
    linearised: the head z = h W of model.forward is differentiated by hand, its JVP dh W + h dW as
    one matmul [dh, h] [W; dW]. Measured by bench.py (small): 1.1-1.2 gradients per call, against
    1.6-1.8 when linearising model.forward whole (same maths)."""
    without_head = lambda t: {k: a for k, a in t.items() if k != "lm_head"}
    body = without_head(theta_t)

    def chunk(xy):
        x, y = xy
        h0, jvp = jax.linearize(lambda p: model.hidden(p, x, cfg), body)
        vjp = jax.linear_transpose(jvp, body)
        W, dW = theta_t["lm_head"].astype(h0.dtype), D["lm_head"].astype(h0.dtype)
        z0 = model.head(h0, W)                                            # fp32 logits
        u = model.head(jnp.concatenate([jvp(without_head(D)), h0], -1), jnp.concatenate([W, dW]))
        logp = jax.nn.log_softmax(z0, -1)        # one pass over the logits serves l, g0 and H0
        p = jnp.exp(logp)
        w = model.ce_grad_logits(p, y, y.size) + model.ce_hvp_logits(p, u, y.size)   # g0 + H0 u
        loss = -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))
        w = w.astype(h0.dtype)
        head = jnp.einsum("btd,btv->dv", h0, w).astype(theta_t["lm_head"].dtype)
        return loss, vjp(w @ W.T)[0] | {"lm_head": head}
    out = jax.lax.map(chunk, tuple(model.split_rows(batch[k], split) for k in ("inputs", "targets")))
    return jax.tree.map(lambda a: jnp.mean(a, 0), out)


def make_inner_step(args, cfg):
    """One outer step of Algorithm 1: N inner steps on the GN model at theta_t, each on a fresh
    micro-batch, then the line search on its own fresh micro-batches."""
    N = args.inner_steps
    opt = model.inner_optimizer(args, data.param_shapes(cfg))[0]
    inner_tick, ls_tick = data.ticker(args, "inner step"), data.ticker(args, "line-search eta")

    @jax.jit
    def step(state, batches, s):
        theta_t = state["params"]
        inner, ls = model.split_step_batches(batches, N)

        grad_q = lambda theta, b: quad_model_grad(theta_t, axpy(-1.0, theta_t, theta), b, cfg, args.split)
        (theta, opt_state), (loss0, model_gnorm, lr) = model.inner_solve(
            grad_q, opt, state["inner"], state["opt"], inner,
            lambda k: model.inner_lr(args, s, k) * state["lr_scale"], inner_tick)
        d = axpy(-1.0, theta_t, theta)
        eta, rejected, m = model.line_search(theta_t, d, ls, cfg, args.ls_range, args.split,
                                             not args.no_reject, ls_tick)    # rejected: eta = 0
        new = model.next_inner_state(args, state, eta, d, theta, opt_state, rejected, opt.init)
        m |= {"train_loss": jnp.mean(loss0), "lr": lr[0], "model_grad_norm": model_gnorm[0], "eta": eta}
        n_ls = ls["inputs"].shape[0]
        return model.finish_gn_step(args, cfg, state, new, m, fwd=N + 1 + (args.ls_range + 1) * n_ls,
                                   jvp=N, vjp=N + 1, inner=inner, d=d)
    return step



# ============================================================================ Hessian-free CG (this project's addition)

def gn_model(params, batch, cfg, split=1):
    """Linearise f once at params on a batch of (B, T) or stacked (K, B, T) micro-batches.
    Returns loss l(z0), the gradient g = J^T dl/dz, and v -> G v reusing the linearisation.
    split > 1 bounds memory instead: the linearisation of every micro-batch's residuals is not
    kept but recomputed chunk by chunk (`split` chunks of rows) inside each product, one more
    forward pass per micro-batch and product."""
    x, y = batch["inputs"], batch["targets"]
    if x.ndim == 2:
        x, y = x[None], y[None]
    N = y.size
    # XLA on CPU (jax 0.10.2) miscompiles model.attention's JVP under jit when the tangent is a
    # compile-time constant (CG's x0 = 0, a block embedded in zeros): inf, nan or garbage from run
    # to run. The barrier keeps every v a runtime value.
    bar = jax.lax.optimization_barrier
    if split > 1:
        loss, g = model.mean_loss_and_grad(params, {"inputs": x, "targets": y}, cfg, split)
        xs, ys = model.split_micro(x, split), model.split_micro(y, split)

        def Gv(v):
            v = bar(v)

            def chunk(acc, xy):
                z0, jvp = jax.linearize(lambda p: model.forward(p, xy[0], cfg), params)
                w = model.ce_hvp_logits(jax.nn.softmax(z0, -1), jvp(v), N)
                return axpy(1.0, jax.linear_transpose(jvp, params)(w)[0], acc), None
            return jax.lax.scan(chunk, jax.tree.map(jnp.zeros_like, v), (xs, ys))[0]
        return loss, g, Gv
    f = lambda p: jax.lax.map(lambda xk: model.forward(p, xk, cfg), x)
    z0, jvp = jax.linearize(f, params)                     # z0: (K, B, T, V)
    vjp = jax.linear_transpose(jvp, params)
    p0 = jax.nn.softmax(z0, -1)                             # once, outside every product
    g = vjp(model.ce_grad_logits(p0, y, N))[0]
    Gv = lambda v: vjp(model.ce_hvp_logits(p0, jvp(bar(v)), N))[0]
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
    j_end, step, f_step, _ = jax.lax.while_loop(lambda c: (c[0] >= 0) & c[3], back,
                                                (n_stored - 1, delta, f_full, True))
    return step, f_step, f_full, n_stored - 1 - j_end


def lm_damping(lam, rho, lo=0.25, hi=0.75):
    """Levenberg-Marquardt (Martens 2010 §4.1): a model that over-predicts the decrease (rho < lo)
    gets more damping, x3/2; one that predicts well (rho > hi) gets less, x2/3."""
    return jnp.where(rho < lo, lam * 1.5, jnp.where(rho > hi, lam * 2 / 3, lam))


def make_cg_step(args, cfg):
    """One outer step of Hessian-free GN: CG on (G + lam I) delta = -g, backtracking, line search."""
    N = args.inner_steps
    store_at = sorted({math.ceil(1.3 ** j) for j in range(40) if math.ceil(1.3 ** j) <= args.cg_iters})
    ls_tick = data.ticker(args, "line-search eta")

    @jax.jit
    def step(state, batches, s):
        theta, lam = state["params"], state["lam"]
        outer, ls = model.split_step_batches(batches, N)
        Kc = args.curvature_batches or N
        loss, g, Gv = gn_model(theta, jax.tree.map(lambda a: a[:Kc], outer), cfg, args.split)
        if Kc < N:   # gradient on the whole outer batch, curvature on a subsample
            loss, g = model.mean_loss_and_grad(theta, outer, cfg, args.split)
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
        step, _, f_full, n_back = backtrack(f, delta, info["stash"], n_st)
        eta, rejected, m = model.line_search(theta, step, ls, cfg, args.ls_range, args.split,
                                             not args.no_reject, ls_tick)
        rho = (f_full - m["ls_loss_eta0"]) / (gd + 0.5 * dGd)     # against the undamped GN model
        new_lam = lm_damping(lam, rho) if args.lam_rule == "lm" else lam
        # a rejected step: theta stays, CG restarts from 0 with twice the damping
        new = {"params": axpy(eta, step, theta), "lam": jnp.where(rejected, 2 * lam, new_lam),
               "delta": jax.tree.map(lambda a: jnp.where(rejected, 0.0, a), delta)}
        m |= {"train_loss": loss, "grad_norm": optax.tree.norm(g), "eta": eta,
              "lam": lam, "rho": rho, "cg_iters": info["iters"], "cg_residual": info["residual"],
              "phi": info["phi"][info["iters"]], "step_norm": eta * optax.tree.norm(step)}
        n_ls_fwd = (args.ls_range + 2 + n_back) * len(ls["inputs"])       # grid + f(0), f(delta), back
        grad_passes = N if Kc < N else 0
        products = info["iters"]                                          # G v products
        # forward passes that run: the stored linearisation of the Kc curvature batches (with
        # --split > 1 none is stored and gn_model's own gradient is dead code when Kc < N),
        # the gradient, the line search, and with --split > 1 one re-linearisation per product
        lin = 0 if args.split > 1 and Kc < N else Kc
        refwd = products * Kc if args.split > 1 else 0
        return model.finish_gn_step(args, cfg, state, new, m, fwd=lin + grad_passes + n_ls_fwd + refwd,
                                   jvp=products * Kc, vjp=(grad_passes or Kc) + products * Kc)
    return step


# ============================================================================ diagnostics

def model_change_coeffs(theta_t, d, batches, cfg, split=1):
    """The GN model along a direction d, averaged over K stacked micro-batches: with u_k = J_k d,
        a = mean_k g0_k^T u_k,   b = mean_k u_k^T H0_k u_k,   q(eta d) - l(z0) = eta a + eta^2/2 b.
    One forward + JVP per micro-batch (jax.jvp: no residuals kept, no VJP)."""
    def chunk(xy):
        x, y = xy
        z0, u = jax.jvp(lambda p: model.forward(p, x, cfg), (theta_t,), (d,))
        p = jax.nn.softmax(z0, -1)
        return jnp.sum(model.ce_grad_logits(p, y, y.size) * u), jnp.sum(model.ce_hvp_logits(p, u, y.size) * u)
    xs, ys = (model.split_micro(batches[k], split) for k in ("inputs", "targets"))
    a, b = jax.lax.map(chunk, (xs, ys))
    return jnp.mean(a), jnp.mean(b)


def make_diagnose(args, cfg):
    """--model-change: at evaluation steps, the GN model's predicted change of the loss, on the
    step's inner (cg: outer) micro-batches, for the step taken eta* d and for the unscaled d."""
    @jax.jit
    def coeffs(old, new, batches):
        taken = axpy(-1.0, old["params"], new["params"])                   # eta* d
        return model_change_coeffs(old["params"], taken, jax.tree.map(
            lambda x: x[:args.inner_steps], batches), cfg, args.split)

    def diagnose(old, new, batches, m):
        eta = float(m["eta"])
        if eta == 0:                                                       # rejected: no step
            return {"model_change": 0.0}
        a, b = coeffs(old, new, batches)
        return {"model_change": a + 0.5 * b, "model_change_d": a / eta + 0.5 * b / eta ** 2}
    return diagnose


# ============================================================================ loop

def init_state(args, cfg, params):
    """The state at step 0. inner: theta_t, the inner iterate and its optimizer state, the lr
    scale (halved at each rejection); cg: theta_t, lambda and CG's warm start delta."""
    if args.solver == "inner":
        state = {"params": params, "inner": params, "opt": model.inner_optimizer(args, params)[0].init(params),
                 "lr_scale": jnp.float32(1)}
    else:
        state = {"params": params, "lam": jnp.float32(args.lam), "delta": jax.tree.map(jnp.zeros_like, params)}
    return state | ({"ema": params} if args.ema else {})


def make_step(args, cfg):
    return (make_inner_step if args.solver == "inner" else make_cg_step)(args, cfg)


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    if args.solver == "inner" and args.inner_opt == "muon":
        run.log("inner-optimizer routing:\n" + data.routing_table(model.inner_optimizer(args, params)[1], params))
    if args.solver == "cg" and args.split > 1:
        run.log(f"cg: --split {args.split}: each G v product re-linearises the curvature "
                "batches chunk by chunk (one more forward per product; memory of one chunk)")
    run.train(init_state(args, cfg, params), make_step(args, cfg),
              diagnose=make_diagnose(args, cfg) if args.model_change else None)


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
