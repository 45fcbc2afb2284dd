"""Full Gauss-Newton: the paper's Algorithm 1, an inner optimizer on the GN model of the loss,
then a line search. (Hessian-free CG on the same model, this project's addition: gn_cg.py.)

GN split (the paper's setup; Martens 2010): logits z = f(theta; x) = model.forward, loss l =
mean token CE. With J = dz/dtheta and H = d2l/dz2 (model.ce_hvp_logits), the Gauss-Newton
matrix over a batch is G = J^T H J, applied as G v = J^T H (J v) from one jax.linearize (J v)
and its linear_transpose (J^T w), never materialised.

Algorithm 1 (the authors' llama_train_gn.py), at theta_t, model.py's GN-family steps (1)-(6):
    q_k(D) = l(z0) + g0^T J D + 1/2 (J D)^T H0 (J D),   z0 = f(theta_t; x_k), D = theta - theta_t
    grad q_k(D) = J^T (g0 + H0 J D)                      one fwd + JVP + VJP per inner step
    N inner steps of Muon (AdamW on embedding, head, 1-D params) or AdamW on fresh batches x_k;
    d = theta - theta_t;  eta* = argmin_{eta in (1/sqrt2)^i, i < ls_range} L(theta_t + eta d)
    theta_{t+1} = theta_t + eta* d;  the inner iterate theta and the optimizer state carry over.
The metrics each logs are listed in docs/running.md ("Metrics").

Differences from the authors' code (natalieabreu/full-gauss-newton, llama_train_gn.py):
  - the line search also evaluates eta = 0 on its batches; a step that no eta > 0 improves is
    rejected: theta stays, the next solve restarts from theta_t with a fresh optimizer state
    and half the inner lr (halved at each rejection, never raised again). Theirs took the best
    eta > 0 whatever it did: from random init at 45m
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
  - GPT-2 BPE and data.py's sources instead of C4 + T5 tokenizer.
"""
import sys

import jax
import jax.numpy as jnp

import data
import model
from model import axpy

# ============================================================================ config

DEFAULTS = {  # flag: (value, or {size: value}; sources of the 45m and 150m values: data.SOURCES)
    "grad_accum": None,                                  # the outer batch is --inner-steps
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("T", "F")),
    "steps": ({"tiny": 4, "small": 10, "45m": 227, "150m": 100}, ("T", "O")),  # 150m: the paper's 54 to 3.25
    "lr": ({"tiny": 3e-3, "small": 3e-3, "45m": 0.01, "150m": 0.003}, ("T", "F")),
    "schedule": ({"tiny": "constant", "small": "constant", "45m": "constant_with_inner_cosine",
                  "150m": "global_cosine"}, ("T", "F")),
    "schedules": ["constant_with_inner_cosine", "global_cosine", "constant"],
    "wd": ({"tiny": 0.0, "small": 0.0, "45m": 0.001, "150m": 0.001}, ("T", "F")),  # optimizer_wd
    "eval_every": ({"tiny": 2, "small": 1, "45m": 10, "150m": 1}, ("T", "F")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    data.gn_flags(p)
    p.add_argument("--model-change", action="store_true",
                   help="at evaluation steps, log model_change and model_change_d, the GN model's "
                        "predicted change of the loss for the step taken and for the unscaled d "
                        "(one forward + JVP per inner micro-batch, 28%% of a small step: a diagnostic)")
    return data.parse_common(p, argv, "gn_full")


# ============================================================================ Algorithm 1

def quad_model_grad(theta_t, D, batch, cfg, n_chunks=1):
    """Algorithm 1's inner gradient on one micro-batch: grad q(D) = J^T (g0 + H0 J D), and l(z0).
    The micro-batch is processed in `n_chunks` equal chunks (means of means). Only model.hidden is
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
    out = jax.lax.map(chunk, tuple(model.chunk_rows(batch[k], n_chunks) for k in ("inputs", "targets")))
    return jax.tree.map(lambda a: jnp.mean(a, 0), out)


def make_step(args, cfg):
    """One outer step of Algorithm 1: N inner steps on the GN model at theta_t, each on a fresh
    micro-batch, then the line search on its own fresh micro-batches. data.Run.train jits it."""
    N = args.inner_steps
    opt = model.inner_optimizer(args, data.param_shapes(cfg))[0]
    inner_tick, ls_tick = data.ticker(args, "inner step"), data.ticker(args, "line-search eta")

    def step(state, batches, s):
        theta_t = state["params"]
        inner_batches, ls_batches = model.inner_and_ls_batches(batches, N)

        grad_q = lambda theta, b: quad_model_grad(theta_t, axpy(-1.0, theta_t, theta), b, cfg, args.split)
        (theta, opt_state), (loss0, gn_model_gnorm, lr) = model.inner_solve(
            grad_q, opt, state["theta_hat"], state["opt"], inner_batches,
            lambda k: model.inner_lr(args, s, k) * state["lr_scale"], inner_tick)
        d = axpy(-1.0, theta_t, theta)
        eta, rejected, m = model.line_search(theta_t, d, ls_batches, cfg, args.ls_range, args.split,
                                             not args.no_reject, ls_tick)    # rejected: eta = 0
        new = model.next_inner_state(args, state, eta, d, theta, opt_state, rejected, opt.init)
        m |= {"train_loss": jnp.mean(loss0), "lr": lr[0], "model_grad_norm": gn_model_gnorm[0], "eta": eta}
        n_ls = ls_batches["inputs"].shape[0]
        return model.finish_gn_step(args, cfg, state, new, m, fwd=N + 1 + (args.ls_range + 1) * n_ls,
                                   jvp=N, vjp=N + 1, trained=inner_batches, d=d)
    return step



# ============================================================================ diagnostics

def gn_model_change_coeffs(theta_t, d, batches, cfg, n_chunks=1):
    """The GN model along a direction d, averaged over K stacked micro-batches: with u_k = J_k d,
        a = mean_k g0_k^T u_k,   b = mean_k u_k^T H0_k u_k,   q(eta d) - l(z0) = eta a + eta^2/2 b.
    One forward + JVP per micro-batch (jax.jvp: no residuals kept, no VJP)."""
    def chunk(xy):
        x, y = xy
        z0, u = jax.jvp(lambda p: model.forward(p, x, cfg), (theta_t,), (d,))
        p = jax.nn.softmax(z0, -1)
        return jnp.sum(model.ce_grad_logits(p, y, y.size) * u), jnp.sum(model.ce_hvp_logits(p, u, y.size) * u)
    xs, ys = (model.chunk_micro(batches[k], n_chunks) for k in ("inputs", "targets"))
    a, b = jax.lax.map(chunk, (xs, ys))
    return jnp.mean(a), jnp.mean(b)


def make_diagnose(args, cfg):
    """--model-change: at evaluation steps, the GN model's predicted change of the loss, on the
    step's inner micro-batches, for the step taken eta* d and for the unscaled d."""
    @jax.jit
    def coeffs(old, new, batches):
        taken = axpy(-1.0, old["params"], new["params"])                   # eta* d
        return gn_model_change_coeffs(old["params"], taken, jax.tree.map(
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
    """The state at step 0: theta_t, the inner iterate and its optimizer state, the lr scale
    (halved at each rejection), and with --ema the EMA."""
    state = {"params": params, "theta_hat": params, "opt": model.inner_optimizer(args, params)[0].init(params),
             "lr_scale": jnp.float32(1)}
    return state | ({"ema": params} if args.ema else {})


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    if args.inner_opt == "muon":
        run.log("inner-optimizer routing:\n" + data.routing_table(model.inner_optimizer(args, params)[1], params))
    run.train(init_state(args, cfg, params), make_step(args, cfg),
              diagnose=make_diagnose(args, cfg) if args.model_change else None)


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
