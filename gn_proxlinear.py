"""GN-prox-linear: the paper's Algorithm 2, the "linearized model method" (§7.2 of the paper).

Like full GN, it linearises the network at the outer iterate theta_t, but keeps the true loss on
the linear model instead of its second-order Taylor expansion. On micro-batch x_k, with
z0 = f(theta_t; x_k), J = df/dtheta at theta_t and D = theta - theta_t:
    p_k(D)      = l(z0 + J D) + lam/2 |D|^2                      convex in D for softmax CE
    grad p_k(D) = J^T (softmax(z0 + J D) - onehot(y)) / N + lam D  one fwd + JVP + VJP per step
GN's model q_k is the Taylor expansion of p_k to second order in J D (at lam = 0), so the gap
between the two methods measures what the higher-order terms of the loss are worth.
Outer step: N inner steps of Muon (AdamW on embedding, head, 1-D) or AdamW on fresh micro-batches
(default schedule global_cosine, which the paper finds best here), d = theta - theta_t, then
theta_{t+1} = theta_t + eta* d with eta* = 1 (the paper finds no line search is needed; turn one
on with --ls-batches). The inner iterate and the optimizer state carry over (warm start).

Differences from the authors' code (natalieabreu/full-gauss-newton, llama_train_gn.py with
--gauss_newton=False):
  - with --ls-batches > 0, a step that no eta > 0 of the line search improves (eta = 0 is
    evaluated too) is rejected, as in gn_full.py: theta stays, the solve restarts from theta_t
    with a fresh optimizer state and half the inner lr (--no-reject: theirs, the best eta > 0);
  - the proximal term pulls toward theta_t: its gradient is +lam D. Theirs took the gradient with
    respect to theta_t, which gives -2 lam D / n_p (n_p: a leaf's size) and pushes away from
    theta_t; inert at lam = 0, which all their configs use;
  - the proximal term is lam/2 |D|^2 over all parameters (theirs: lam sum_leaves mean(D^2));
  - the inner lr is applied outside the optimizer from the global inner step (as gn_full.py);
  - Muon's 1-D params go to the AdamW group; no EMA by default (--ema evaluates it separately);
  - the logged train_loss is the true loss at theta_t; resume restores the inner solver's state;
  - GPT-2 BPE and data.py's sources instead of C4 with the T5 tokenizer.

Metrics as gn_full.py's: train_loss l(theta_t) over the inner micro-batches,
grad_norm |grad l(theta_t)| on the first inner micro-batch, model_grad_norm |grad p(D0)| at the
warm start (first inner micro-batch), eta, step_norm |eta* d|, inner_norm |d|, the passes, and
with a line search ls_loss, ls_loss_eta0 and rejected.
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
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("G", "G")),
    "steps": ({"tiny": 4, "small": 10, "45m": 227, "150m": 100}, ("G", "G")),
    "lr": ({"tiny": 3e-3, "small": 3e-3, "45m": 0.01, "150m": 0.003}, ("G", "G")),
    "schedule": ("global_cosine", ("P", "G")),
    "schedules": ["global_cosine", "constant_with_inner_cosine", "constant"],
    "wd": ({"tiny": 0.0, "small": 0.0, "45m": 0.001, "150m": 0.001}, ("G", "G")),
    "eval_every": ({"tiny": 2, "small": 1, "45m": 10, "150m": 1}, ("G", "G")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    data.gn_flags(p, ls_batches=(0, ("P", "P")))   # the paper: prox-linear needs no line search
    p.flag("--prox-lam", 0.0, "lam: weight of the proximal term lam/2 |theta - theta_t|^2",
           type=data.nonneg_float)
    return data.parse_common(p, argv, "gn_proxlinear")


# ============================================================================ maths

def prox_model_grad(theta_t, D, batch, cfg, lam=0.0, n_chunks=1):
    """Algorithm 2's inner gradient on one micro-batch: grad p(D) = J^T dl/dz (z0 + J D) + lam D,
    and l(z0), the true loss at theta_t. Chunked in `n_chunks` rows as gn_full."""
    def chunk(xy):
        x, y = xy
        z0, jvp = jax.linearize(lambda p: model.forward(p, x, cfg), theta_t)
        vjp = jax.linear_transpose(jvp, theta_t)
        z = z0 + jvp(D)                                   # the linearised logits
        return model.cross_entropy(z0, y), vjp(model.ce_grad_logits(jax.nn.softmax(z, -1), y, y.size))[0]
    loss0, g = jax.tree.map(lambda a: jnp.mean(a, 0), jax.lax.map(
        chunk, tuple(model.chunk_rows(batch[k], n_chunks) for k in ("inputs", "targets"))))
    return loss0, axpy(lam, D, g)


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg):
    """One outer step: N inner steps on the prox-linear model at theta_t, then eta* = 1 (or the
    line search with --ls-batches)."""
    N = args.inner_steps
    opt = model.inner_optimizer(args, data.param_shapes(cfg))[0]
    inner_tick, ls_tick = data.ticker(args, "inner step"), data.ticker(args, "line-search eta")

    def step(state, batches, s):
        theta_t = state["params"]
        inner_batches, ls_batches = model.inner_and_ls_batches(batches, N)

        grad_p = lambda theta, b: prox_model_grad(theta_t, axpy(-1.0, theta_t, theta), b, cfg, args.prox_lam,
                                                  args.split)
        (theta, opt_state), (loss0, gnorm, lr) = model.inner_solve(
            grad_p, opt, state["theta_hat"], state["opt"], inner_batches,
            lambda k: model.inner_lr(args, s, k) * state["lr_scale"], inner_tick)
        d = axpy(-1.0, theta_t, theta)
        # eta = 1 without line-search batches, the paper's default here
        eta, rejected, m = model.line_search(theta_t, d, ls_batches, cfg, args.ls_range, args.split,
                                             not args.no_reject, ls_tick)
        new = model.next_inner_state(args, state, eta, d, theta, opt_state, rejected, opt.init)
        m |= {"train_loss": jnp.mean(loss0), "lr": lr[0], "model_grad_norm": gnorm[0], "eta": eta}
        n_ls = ls_batches["inputs"].shape[0]
        return model.finish_gn_step(args, cfg, state, new, m, fwd=N + 1 + (args.ls_range + 1) * n_ls,
                                   jvp=N, vjp=N + 1, trained=inner_batches, d=d)
    return step



# ============================================================================ loop

def init_state(args, cfg, params):
    """theta_t, the inner iterate and its optimizer state, the lr scale (halved at a rejection)."""
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
    run.train(init_state(args, cfg, params), make_step(args, cfg))


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
