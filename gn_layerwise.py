"""Layerwise GN: the block-diagonal Gauss-Newton preconditioner, the paper's layerwise oracle.

The parameters are cut into K = L + 2 blocks, selected by exact keys: wte; each transformer block
h[i] with its own norms (the last one with ln_f); lm_head. Every block k is solved on its own, all
linearised at the same theta_t with the other blocks frozen (Jacobi style). With J_k = df/dtheta_k
(a block-restricted JVP, and its transpose for the VJP) and D_k = phi_k - theta_t,k:
    --objective gn:         q_k(D_k) = l(z0) + g0^T J_k D_k + 1/2 (J_k D_k)^T H0 (J_k D_k)
                            grad     = J_k^T (g0 + H0 J_k D_k)       i.e. G_kk, a diagonal block of G
    --objective proxlinear: p_k(D_k) = l(z0 + J_k D_k),  grad = J_k^T dl/dz (z0 + J_k D_k)
Each block runs N inner steps (Muon for its matrices, AdamW for the rest; or AdamW) on the same
N fresh micro-batches, with its own optimizer state. The merged direction d = (phi_k - theta_t,k)_k
then gets one global line search, theta_{t+1} = theta_t + eta* d, and each block's unscaled
phi_k warm-starts the next solve. An outer step costs K x N inner steps.

Differences from the authors' code (natalieabreu/full-gauss-newton, llama_train_gn_layerwise.py):
  - a step that no eta > 0 of the line search improves (eta = 0 is evaluated too) is rejected,
    as in gn_full.py: theta stays, every solve restarts from theta_t with fresh optimizer
    states and half the inner lr (--no-reject: theirs, the best eta > 0 whatever it does);
  - blocks are selected by exact keys: their string-prefix match on "h.1" also caught h.10 and
    h.11 at 150m, and their script, as released, jits loss_fn in main before defining it;
  - J_k is a JVP restricted to the block's parameters, not a full product with the rest frozen
    by stop_gradient; each block's optimizer state holds only that block (theirs: whole tree);
  - the inner lr is applied outside the optimizer from the global inner step (as gn_full.py);
  - Muon's 1-D params go to the AdamW group; no EMA by default; resume restores every block's
    state; GPT-2 BPE and data.py's sources instead of C4 with the T5 tokenizer.

Metrics as gn_full.py's: train_loss l(theta_t) over the inner micro-batches,
grad_norm |grad l(theta_t)| on the first inner micro-batch, model_grad_norm the norm of the
K blocks' model gradients at their warm starts (first inner micro-batch), eta, step_norm
|eta* d|, inner_norm |d|, ls_loss, ls_loss_eta0, rejected, and the passes of the network.
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
    "steps": ({"tiny": 4, "small": 5, "45m": 227, "150m": 120}, ("G", "O")),  # 150m: the paper's 78 to 3.25
    "lr": ({"tiny": 3e-3, "small": 3e-3, "45m": 0.01, "150m": 0.003}, ("G", "G")),
    "schedule": ({"tiny": "constant", "small": "constant", "45m": "constant_with_inner_cosine",
                  "150m": "global_cosine"}, ("G", "G")),
    "schedules": ["constant_with_inner_cosine", "global_cosine", "constant"],
    "wd": ({"tiny": 0.0, "small": 0.0, "45m": 0.001, "150m": 0.001}, ("G", "G")),
    "eval_every": ({"tiny": 2, "small": 1, "45m": 10, "150m": 1}, ("G", "G")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    # the authors' layerwise line search: 10 etas
    data.gn_flags(p, ls_range=({"tiny": 10, "small": 7, "45m": 10, "150m": 10}, ("A", "A")))
    p.flag("--objective", "gn", "each block's model: gn (quadratic) or proxlinear (CE of the "
           "linearised logits)", choices=["gn", "proxlinear"])
    return data.parse_common(p, argv, "gn_layerwise")


# ============================================================================ maths

def make_blocks(cfg):
    """The K = L + 2 blocks, each a tuple of exact keys: names, or i for params["h"][i]."""
    L = cfg.n_layers
    return [("wte",)] + [(i,) for i in range(L - 1)] + [(L - 1, "ln_f"), ("lm_head",)]


def get_block(params, keys):
    """The block's sub-tree, e.g. {"h": {3: params["h"][3]}, "ln_f": ...}: exact keys only."""
    sub = {k: params[k] for k in keys if isinstance(k, str)}
    blocks = {i: params["h"][i] for i in keys if isinstance(i, int)}
    return sub | ({"h": blocks} if blocks else {})


def set_block(params, keys, sub):
    new = dict(params, h=list(params["h"]))
    for k in keys:
        if isinstance(k, int):
            new["h"][k] = sub["h"][k]
        else:
            new[k] = sub[k]
    return new


def block_linearize(theta_t, keys, x, cfg):
    """f restricted to one block at theta_t: z0, the block JVP J_k and its transpose J_k^T."""
    th_k = get_block(theta_t, keys)
    z0, jvp = jax.linearize(lambda phi: model.forward(set_block(theta_t, keys, phi), x, cfg), th_k)
    vjp = jax.linear_transpose(jvp, th_k)
    return z0, jvp, lambda w: vjp(w)[0]


def block_inner_grad(theta_t, keys, D_k, batch, cfg, objective="gn", n_chunks=1):
    """One block's inner gradient on one micro-batch, with l(z0); chunked in `n_chunks` rows."""
    def chunk(xy):
        x, y = xy
        z0, jvp, vjp = block_linearize(theta_t, keys, x, cfg)
        u, n_tok = jvp(D_k), y.size
        if objective == "gn":                  # g0 + H0 u
            p = jax.nn.softmax(z0, -1)
            w = model.ce_grad_logits(p, y, n_tok) + model.ce_hvp_logits(p, u, n_tok)
        else:                                  # dl/dz at the linearised logits z0 + u
            w = model.ce_grad_logits(jax.nn.softmax(z0 + u, -1), y, n_tok)
        return model.cross_entropy(z0, y), vjp(w)
    loss0, g = jax.lax.map(chunk, tuple(model.chunk_rows(batch[k], n_chunks) for k in ("inputs", "targets")))
    return jnp.mean(loss0), jax.tree.map(lambda a: jnp.mean(a, 0), g)


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg, blocks=None):
    """One outer step: each block's N inner steps on the same N fresh micro-batches, all at
    theta_t, then one line search on the merged direction. blocks: make_blocks(cfg) by default."""
    N = args.inner_steps
    blocks = blocks or make_blocks(cfg)
    shapes = data.param_shapes(cfg)
    opts = [model.inner_optimizer(args, get_block(shapes, keys))[0] for keys in blocks]
    ls_tick = data.ticker(args, "line-search eta")

    def step(state, batches, s):
        theta_t = state["params"]
        inner_batches, ls_batches = model.inner_and_ls_batches(batches, N)
        phi_all, opt_states, loss0, gnorms = state["theta_hat"], [], None, []   # phi: unscaled
        for keys, opt, opt_state in zip(blocks, opts, state["opt"]):   # K sub-problems, same data
            grad_k = lambda phi, b, keys=keys: block_inner_grad(
                theta_t, keys, axpy(-1.0, get_block(theta_t, keys), phi), b, cfg, args.objective, args.split)
            (phi, opt_state), (loss0, gnorm, _) = model.inner_solve(
                grad_k, opt, get_block(phi_all, keys), opt_state, inner_batches,
                lambda k: model.inner_lr(args, s, k) * state["lr_scale"],
                data.ticker(args, f"block {keys} inner step"))
            phi_all = set_block(phi_all, keys, phi)
            opt_states.append(opt_state)
            gnorms.append(gnorm[0])
        d = axpy(-1.0, theta_t, phi_all)                                  # the merged direction
        eta, rejected, m = model.line_search(theta_t, d, ls_batches, cfg, args.ls_range, args.split,
                                             not args.no_reject, ls_tick)    # rejected: eta = 0
        fresh = lambda th: [opt.init(get_block(th, keys)) for keys, opt in zip(blocks, opts)]
        new = model.next_inner_state(args, state, eta, d, phi_all, opt_states, rejected, fresh)
        K, n_ls = len(blocks), ls_batches["inputs"].shape[0]
        m |= {"train_loss": jnp.mean(loss0), "lr": model.inner_lr(args, s, 0) * state["lr_scale"],
              "model_grad_norm": jnp.sqrt(sum(g ** 2 for g in gnorms)), "eta": eta}
        return model.finish_gn_step(args, cfg, state, new, m, fwd=K * N + 1 + (args.ls_range + 1) * n_ls,
                                   jvp=K * N, vjp=K * N + 1, trained=inner_batches, d=d)
    return step



# ============================================================================ loop

def init_state(args, cfg, params, blocks=None):
    """theta_t, the merged inner iterate, each block's optimizer state, the lr scale."""
    blocks = blocks or make_blocks(cfg)
    opt_states = [model.inner_optimizer(args, get_block(params, keys))[0].init(get_block(params, keys))
                  for keys in blocks]
    state = {"params": params, "theta_hat": params, "opt": opt_states, "lr_scale": jnp.float32(1)}
    return state | ({"ema": params} if args.ema else {})


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    blocks = make_blocks(cfg)
    run.log(f"{len(blocks)} blocks: " + ", ".join(
        "+".join(f"h[{k}]" if isinstance(k, int) else k for k in keys) for keys in blocks))
    run.train(init_state(args, cfg, params), make_step(args, cfg),
              extra_config={"blocks": [list(b) for b in blocks]})


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
