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

Metrics as gn_full.py --solver inner: train_loss l(theta_t) over the inner micro-batches,
grad_norm |grad l(theta_t)| on the first inner micro-batch, model_grad_norm |grad p(D0)| at the
warm start (first inner micro-batch), eta, step_norm |eta* d|, inner_norm |d|, the passes, and
with a line search ls_loss, ls_loss_eta0 and rejected.
"""
import sys

import jax
import jax.numpy as jnp
import optax

import data
import model

# ============================================================================ config

DEFAULTS = {  # (paper default used for 45m/150m, {size: CPU preset})
    "grad_accum": None,                                  # the outer batch is --inner-steps
    "steps": (227, {"small": 10, "tiny": 4}),
    "lr": (0.01, {"small": 3e-3, "tiny": 3e-3}),
    "schedule": ("global_cosine", {}),
    "schedules": ["global_cosine", "constant_with_inner_cosine", "constant"],
    "wd": (0.001, {"small": 0.0, "tiny": 0.0}),
    "eval_every": (10, {"small": 1, "tiny": 2}),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    data.gn_flags(p, ls_batches=(0, {}))
    p.flag("--prox-lam", 0.0, "lam: weight of the proximal term lam/2 |theta - theta_t|^2",
           type=data.nonneg_float)
    return data.parse_common(p, argv, "gn_proxlinear")


# ============================================================================ maths

axpy = lambda a, x, y: jax.tree.map(lambda u, v: a * u + v, x, y)       # a x + y


def prox_model_grad(theta_t, D, batch, cfg, lam=0.0, split=1):
    """Algorithm 2's inner gradient on one micro-batch: grad p(D) = J^T dl/dz (z0 + J D) + lam D.
    Also returns l(z0), the true loss at theta_t, and p(D). Chunked in `split` rows as gn_full."""
    def chunk(xy):
        x, y = xy
        z0, jvp = jax.linearize(lambda p: model.forward(p, x, cfg), theta_t)
        vjp = jax.linear_transpose(jvp, theta_t)
        z = z0 + jvp(D)                                   # the linearised logits
        dl_dz = (jax.nn.softmax(z, -1) - jax.nn.one_hot(y, z.shape[-1])) / y.size
        return model.cross_entropy(z0, y), model.cross_entropy(z, y), vjp(dl_dz)[0]
    loss0, loss_lin, g = jax.tree.map(lambda a: jnp.mean(a, 0), jax.lax.map(
        chunk, tuple(model.split_rows(batch[k], split) for k in ("inputs", "targets"))))
    prox = 0.5 * lam * sum(jnp.vdot(a, a) for a in jax.tree.leaves(D))
    return loss0, loss_lin + prox, axpy(lam, D, g)


# ============================================================================ step

def make_step(args, cfg, opt):
    N, n_ls = args.inner_steps, args.ls_batches

    @jax.jit
    def step(state, batches, s):
        theta_t = state["params"]
        inner = jax.tree.map(lambda a: a[:N], batches)
        ls = jax.tree.map(lambda a: a[N:], batches)

        def one(carry, xs):
            theta, opt_state = carry
            k, b = xs
            D = axpy(-1.0, theta_t, theta)
            loss0, _, grad = prox_model_grad(theta_t, D, b, cfg, args.prox_lam, args.split)
            updates, opt_state = opt.update(grad, opt_state, theta)
            lr = data.inner_lr(args, s, k) * state["lr_scale"]
            theta = axpy(lr, updates, theta)
            jax.debug.callback(data.tick, k, N, "inner step")
            return (theta, opt_state), (loss0, optax.tree.norm(grad), lr)

        (theta, opt_state), (loss0, gnorm, lr) = jax.lax.scan(
            one, (state["inner"], state["opt"]), (jnp.arange(N), inner))
        d = axpy(-1.0, theta_t, theta)
        m = {}
        # eta = 1 without line-search batches, the paper's default here
        eta, rejected, _ = data.line_search(args, theta_t, d, ls, cfg, m)
        theta_next = axpy(eta, d, theta_t)                                # theta_t if rejected
        if args.reset_start:
            theta, opt_state = theta_next, opt.init(theta_next)
        else:      # a rejected step restarts the solve from theta_t with a fresh optimizer state
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(rejected, a, b), new, old)
            theta, opt_state = keep(theta_t, theta), keep(opt.init(theta_t), opt_state)
        new = {"params": theta_next, "inner": theta, "opt": opt_state,
               "lr_scale": state["lr_scale"] * jnp.where(rejected, 0.5, 1.0)}
        if args.ema:
            new["ema"] = axpy(args.ema, axpy(-1.0, theta_next, state["ema"]), theta_next)
        g1 = model.mean_loss_and_grad(theta_t, jax.tree.map(lambda x: x[:1], inner), cfg, args.split)[1]
        m |= {"train_loss": jnp.mean(loss0), "lr": lr[0], "grad_norm": optax.tree.norm(g1),
              "model_grad_norm": gnorm[0], "eta": eta, "step_norm": eta * optax.tree.norm(d),
              "inner_norm": optax.tree.norm(d),
              "fwd_passes": N + 1 + (args.ls_range + 1) * n_ls, "jvp_passes": N, "vjp_passes": N + 1,
              "tokens_trained": N * args.batch_size * cfg.seq_len}
        return new, m
    return step


# ============================================================================ loop

def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    opt, labels = data.inner_optimizer(args, params)
    if args.inner_opt == "muon":
        run.log("inner-optimizer routing:\n" + data.routing_table(labels, params))
    state = {"params": params, "inner": params, "opt": opt.init(params), "lr_scale": jnp.float32(1)}
    if args.ema:
        state["ema"] = params
    run.train(state, make_step(args, cfg, opt), micro_per_step=args.inner_steps + args.ls_batches,
              extra_config={"tokens_per_outer_step": (args.inner_steps + args.ls_batches)
                            * args.batch_size * cfg.seq_len})


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
