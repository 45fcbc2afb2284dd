"""SOAP (Vyas et al. 2024, arXiv 2409.11321): Adam in the eigenbasis of Shampoo's preconditioner.

One optimizer step on K = --grad-accum micro-batches; for each 2-D parameter W (m x n) with the
clipped mean gradient g (SOAP Algorithm 3, reference nikhilvyas/SOAP soap.py):
    g' = Q_L^T g Q_R                                 rotate into the current eigenbasis
    M  = b1 M + (1 - b1) g',   V = b2 V + (1 - b2) g'^2          Adam moments, rotated basis
    W  = W - lr_t sqrt(1 - b2^t)/(1 - b1^t) Q_L (M / (sqrt(V) + eps)) Q_R^T,  then W -= lr_t wd W
    L  = bs L + (1 - bs) g g^T,   R = bs R + (1 - bs) g^T g      after the step (bs = b2)
    every f steps: Q <- QR(L Q_sorted) (one power iteration), with V re-sorted to match
The first step only builds L, R and Q = eigh(L), eigh(R) and moves nothing. Sides longer than
max_precond_dim (10000: the vocab side of wte and lm_head) stay unrotated; 1-D parameters get AdamW.
The CPU presets lower max_precond_dim below their vocab (8192 and 512) so that, as in the paper,
the vocab side stays unrotated (an 8192 x 8192 eigenbasis would also dominate the step's cost).
Defaults: the authors' SOAP factory (b1 0.9, b2 0.95, f 10, eps 1e-8, wd 0, clip 1); the paper's
tuned SOAP lr is in its Appendix G, which we could not read: lr 3e-3 is the SOAP reference default.
At 150m, GN's 240M tokens per step (1831 x 128 x 1024): no source gives SOAP's batch in Figure 1.

Differences from the authors' code (natalieabreu/full-gauss-newton, optimizers.py + soap_jax):
  - SOAP written here by hand as an optax GradientTransformation (they used haydn-jones/SOAP_JAX,
    unpinned); decay uses the pre-update W (p - lr U - lr wd p; the reference decays after, equal
    to first order in lr);
  - gradients are accumulated by lax.scan inside one jitted step rather than optax.MultiSteps;
  - no EMA of the weights; GPT-2 BPE and data.py's sources instead of C4 with the T5 tokenizer.
"""
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import data
import model

# ============================================================================ config

DEFAULTS = {  # flag: (value, or {size: value}; sources of the 45m and 150m values: data.SOURCES)
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("T", "O")),  # 150m: GN's micro-batch
    # 150m: GN's 240M tokens per step (1831 x 128 x 1024): no source gives SOAP's batch in Figure 1
    "grad_accum": ({"tiny": 2, "small": 8, "45m": 122, "150m": 1831}, ("T", "O")),
    "steps": ({"tiny": 4, "small": 30, "45m": 227, "150m": 400}, ("T", "O")),  # 150m: the paper's 292 to 3.25
    "lr": (3e-3, ("O", "O")),
    "schedule": ("constant", ("T", "O")),
    "schedules": ["constant", "warmup_constant", "warmup_cosine"],
    "wd": (0.0, ("T", "O")),
    "eval_every": ({"tiny": 2, "small": 5, "45m": 1, "150m": 1}, ("T", "O")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    p.flag("--b1", 0.9, "beta1 (SOAP and AdamW)", type=data.unit_float)
    p.flag("--b2", 0.95, "beta2 (SOAP and AdamW; also SOAP's preconditioner beta)", type=data.unit_float)
    p.flag("--eps", 1e-8, "epsilon", type=data.pos_float)
    p.flag("--precondition-frequency", 10, "f: steps between eigenbasis refreshes", type=data.pos_int)
    p.flag("--max-precond-dim", {"tiny": 256, "small": 4096, "45m": 10000, "150m": 10000},
           "sides longer than this are not rotated (CPU presets keep "
           "the vocab side unrotated, as V = 32000 > 10000 does at the paper's sizes)", type=data.pos_int)
    return data.parse_common(p, argv, "soap")


# ============================================================================ maths

_HI = jax.lax.Precision.HIGHEST
_EMPTY = lambda: jnp.zeros((0,), jnp.float32)  # placeholder for "this side is not rotated"


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


class SoapState(NamedTuple):
    count: jax.Array  # int32 scalar: number of update() calls so far
    mu: optax.Updates  # M, first moment, in the rotated basis
    nu: optax.Updates  # V, second moment, in the rotated basis
    L: optax.Updates  # (m, m) left Shampoo factor, or zeros((0,)) if side not rotated
    R: optax.Updates  # (n, n) right Shampoo factor, or zeros((0,))
    Q_L: optax.Updates  # eigenbasis of L (columns, descending eigenvalue), or zeros((0,))
    Q_R: optax.Updates


def _soap_leaf(g, M, V, L, R, Q_L, Q_R, t, b1, b2, bs, eps, freq):
    """One parameter. Sides whose factor is zero-size are identity (static, shape-based choice)."""
    rot_l, rot_r = L.size > 0, R.size > 0
    g = g.astype(jnp.float32)

    def project(X, Q_L, Q_R):  # X -> Q_L^T X Q_R
        X = _mm(Q_L.T, X) if rot_l else X
        return _mm(X, Q_R) if rot_r else X

    def project_back(X, Q_L, Q_R):  # X -> Q_L X Q_R^T
        X = _mm(Q_L, X) if rot_l else X
        return _mm(X, Q_R.T) if rot_r else X

    def update_factors(L, R):  # lerp towards the current outer products (torch: GG.lerp_(GG^T, 1-beta_s))
        L = L + (1 - bs) * (_mm(g, g.T) - L) if rot_l else L
        R = R + (1 - bs) * (_mm(g.T, g) - R) if rot_r else R
        return L, R

    def first_step(_):
        # Only build the preconditioner: the reference skips the first update for every parameter so that
        # the eigenbasis never contains the gradient it is applied to.  Exact eigh, descending order.
        L1, R1 = update_factors(L, R)
        eig = lambda A: jnp.flip(jnp.linalg.eigh(A + 1e-30 * jnp.eye(A.shape[0], dtype=A.dtype))[1], 1)
        return (jnp.zeros_like(g), M, V, L1, R1,
                eig(L1) if rot_l else Q_L, eig(R1) if rot_r else Q_R)

    def later_step(_):
        gp = project(g, Q_L, Q_R)
        M1 = b1 * M + (1 - b1) * gp
        V1 = b2 * V + (1 - b2) * gp * gp
        tf = t.astype(jnp.float32)
        U = project_back(M1 / (jnp.sqrt(V1) + eps), Q_L, Q_R)
        direction = U * (jnp.sqrt(1 - b2**tf) / (1 - b1**tf))
        # Factors see the current g only after it was used, as in the reference.
        L1, R1 = update_factors(L, R)

        def refresh(ops):
            # Cheap eigenbasis refresh: one power iteration + QR, warm-started from the old Q.  M lives in the
            # rotated basis, so take it back with the OLD Q and re-project with the new one.  V is only
            # permuted (re-sorting eigen-directions keeps each V entry attached to its direction).
            M1, V1, Q_L, Q_R = ops
            M_orig = project_back(M1, Q_L, Q_R)

            def new_basis(F, Q, V1, axis):
                est = jnp.sum(Q * _mm(F, Q), axis=0)  # diag(Q^T F Q): eigenvalue estimates
                order = jnp.argsort(-est)  # descending
                Q_sorted = Q[:, order]
                return jnp.linalg.qr(_mm(F, Q_sorted))[0], jnp.take(V1, order, axis=axis)

            if rot_l:
                Q_L, V1 = new_basis(L1, Q_L, V1, 0)
            if rot_r:
                Q_R, V1 = new_basis(R1, Q_R, V1, 1)
            return project(M_orig, Q_L, Q_R), V1, Q_L, Q_R

        ops = (M1, V1, Q_L, Q_R)
        if rot_l or rot_r:
            ops = jax.lax.cond(t % freq == 0, refresh, lambda o: o, ops)
        M1, V1, Q_L1, Q_R1 = ops
        return direction, M1, V1, L1, R1, Q_L1, Q_R1

    return jax.lax.cond(t == 0, first_step, later_step, None)


def scale_by_soap(b1=0.9, b2=0.95, eps=1e-8, shampoo_beta=None, precondition_frequency=10,
                  max_precond_dim=10000) -> optax.GradientTransformation:
    """SOAP direction (positive sign, like optax.scale_by_adam). The first update is exactly zero."""
    bs = b2 if shampoo_beta is None else shampoo_beta

    def init_fn(params):
        def factor(p, i):  # (d, d) zeros for a rotated side of a 2-D param, else the placeholder
            if p.ndim not in (1, 2):
                raise ValueError(f"scale_by_soap supports only 1-D or 2-D params, got shape {p.shape}")
            d = p.shape[i] if p.ndim == 2 else max_precond_dim + 1
            return jnp.zeros((d, d), jnp.float32) if d <= max_precond_dim else _EMPTY()

        eye = lambda F: jnp.eye(F.shape[0], dtype=jnp.float32) if F.size else F
        per_leaf = lambda i, f: jax.tree.map(lambda p: f(factor(p, i)), params)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return SoapState(jnp.zeros([], jnp.int32), zeros, zeros, per_leaf(0, lambda F: F),
                         per_leaf(1, lambda F: F), per_leaf(0, eye), per_leaf(1, eye))

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        if not leaves:
            return updates, state._replace(count=optax.safe_increment(state.count))
        rest = [treedef.flatten_up_to(x) for x in state[1:]]
        outs = [_soap_leaf(g, *xs, state.count, b1, b2, bs, eps, precondition_frequency)
                for g, *xs in zip(leaves, *rest)]
        d, *new = [treedef.unflatten(list(col)) for col in zip(*outs)]
        d = jax.tree.map(lambda x, g: x.astype(g.dtype), d, updates)
        return d, SoapState(optax.safe_increment(state.count), *new)

    return optax.GradientTransformation(init_fn, update_fn)


def _decoupled_weight_decay(lr, weight_decay) -> optax.GradientTransformation:
    """Adds -lr*wd*p (pre-update p), skipped on the first (zero) step so that step leaves p unchanged.
    The reference does W <- W - step*U, then W <- W - lr*wd*W; we use the old W, i.e. exactly
    p_new = p - step*U - lr*wd*p (equal to first order in lr)."""
    def update_fn(updates, count, params=None):
        if params is None:
            raise ValueError("soap weight decay needs params")
        rate = jnp.where(count > 0, (lr(count) if callable(lr) else lr) * weight_decay, 0.0)
        updates = jax.tree.map(lambda u, p: u - (rate * p).astype(u.dtype), updates, params)
        return updates, optax.safe_increment(count)

    return optax.GradientTransformation(lambda _: jnp.zeros([], jnp.int32), update_fn)


def soap(learning_rate, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, shampoo_beta=None,
         precondition_frequency=10, max_precond_dim=10000) -> optax.GradientTransformation:
    """SOAP optimizer. A schedule is evaluated at (number of real updates - 1): the first update() call
    is the skipped preconditioner-initialisation step, so the first REAL update uses schedule(0)."""
    lr = (lambda c: learning_rate(jnp.maximum(c - 1, 0))) if callable(learning_rate) else learning_rate
    parts = [scale_by_soap(b1, b2, eps, shampoo_beta, precondition_frequency, max_precond_dim),
             optax.scale_by_learning_rate(lr)]
    if weight_decay:
        parts.append(_decoupled_weight_decay(lr, weight_decay))
    return optax.chain(*parts)


def label(path, leaf):
    """SOAP for every 2-D matrix (embedding and head included, as the authors), AdamW for 1-D."""
    return "soap" if leaf.ndim == 2 else "adam"


def make_optimizer(args, params):
    labels = jax.tree_util.tree_map_with_path(label, params)
    assert len(jax.tree.leaves(labels)) == len(jax.tree.leaves(params))     # every leaf, once
    lr = model.make_schedule(args.schedule, args.lr, args.warmup, args.steps)
    clip = lambda: optax.clip_by_global_norm(args.clip) if args.clip else optax.identity()
    groups = {"soap": optax.chain(clip(), soap(lr, args.b1, args.b2, args.eps, args.wd,
                                               precondition_frequency=args.precondition_frequency,
                                               max_precond_dim=args.max_precond_dim)),
              "adam": optax.chain(clip(), optax.adamw(lr, args.b1, args.b2, args.eps, weight_decay=args.wd))}
    return optax.multi_transform(groups, labels), lr


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg):
    """One optimizer step on the mean gradient of the step's --grad-accum micro-batches."""
    opt, lr = make_optimizer(args, data.param_shapes(cfg))
    tick = data.ticker(args, "micro-batch chunk")

    def step(state, batches, t):
        params = state["params"]
        loss, g = model.mean_loss_and_grad(params, batches, cfg, args.split, on_micro=tick)
        updates, opt_state = opt.update(g, state["opt"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"train_loss": loss, "lr": lr(t), "grad_norm": optax.tree.norm(g)}
        return {"params": params, "opt": opt_state}, metrics
    return step


# ============================================================================ loop

def init_state(args, cfg, params):
    return {"params": params, "opt": make_optimizer(args, params)[0].init(params)}


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    run.train(init_state(args, cfg, params), make_step(args, cfg))


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
