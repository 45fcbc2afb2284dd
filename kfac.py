"""K-FAC (Martens & Grosse 2015, arXiv 1503.05671): each dense layer's block of the GGN as a
Kronecker product, the approximation of the layerwise GN preconditioner the paper's thesis invites.

For each dense matrix W (in, out) of the blocks (wq wk wv wo w1 w2), with s = a W its output and
the step's n_tok tokens n (every position of every sequence an example: K-FAC-expand, Eschenhagen
et al. 2023, arXiv 2311.00636, the choice for a loss that sums over positions, as an LM's does):
    A = 1/n_tok sum_n a_n a_n^T (in x in),   Gam = 1/n_tok sum_n g_n g_n^T (out x out)
(Gam: Grosse & Martens 2016's Gamma; G is the GGN in this repository)
    g_n = d/ds_n sum_m CE(z_m, y^_m),   y^_m ~ softmax(z_m)          targets sampled from the model
So E[Gam] is the GGN's (for softmax CE the Fisher is the GGN, H = diag(p) - p p^T), and the layer's
GGN block F_W = 1/n_tok sum_n (a_n a_n^T) (x) E[g_n g_n^T] is approximated by A (x) Gam. Then, step t:
    A_t = decay A_{t-1} + (1 - decay) A,  Gam_t likewise,  decay = min(1 - 1/t, --stat-decay)   [M&G]
    every f = --precondition-frequency steps, factored Tikhonov damping [M&G §6.3]:
        pi = sqrt((tr A_t / in) / (tr Gam_t / out))
        A^-1 = (A_t + pi sqrt(lam) I)^-1,   Gam^-1 = (Gam_t + sqrt(lam) / pi I)^-1
    U = A^-1 grad_W Gam^-1          = (A (x) Gam + damping)^-1 grad_W in our (in, out) storage
    m = mu m + U,   W = W - lr_t m                         heavy-ball momentum (mu = --momentum)
grad_W is the mean loss's gradient on the data's targets, clipped by the group's global norm
(--clip), as Muon's group is. wte, lm_head and every 1-D leaf get AdamW (--adam-lr, b1, b2, wd),
routed as Muon and GN's inner optimizer route them (model.muon_label); the head's Gam would be
V x V. One forward and two backward passes per micro-batch: one on the data's targets (the
gradient), one on the sampled ones (Gam); A comes from the forward.

Cost at the paper's sizes: per block eight d x d factors (the A of wq wk wv, which read one input,
of wo and w1; the Gam of wq wk wv wo w2) and two d_ff x d_ff (w1's Gam, w2's A). At 150m (d 768, d_ff
3072) that is 23.6M floats a block, 94 MB; with the inverses (one A^-1 and Gam^-1 per layer: pi
differs) 2.3 GB over the 12 blocks (the largest factor 3072^2, 36 MiB), replicated like the
params; one eigh of each factor every f steps, about 10 n^3 flops each: 7.4e12 flops at 150m,
amortised over f.

Choices and their sources (no authors' code: the paper does not run K-FAC):
  - sampled-target Gam, one sample per token (M&G; not the empirical Fisher of the data's labels);
  - K-FAC-expand over positions (Eschenhagen et al. 2023); K-FAC-reduce would sum a and g over a
    sequence's positions first, a different approximation for shared weights;
  - factored Tikhonov damping with a fixed lam (M&G §6.3); M&G adapt lam, lr and momentum from a
    quadratic model, which kfac-jax's examples call of questionable use in the stochastic setting:
    here lr and lam are swept like every method's hyperparameters;
  - inverses by eigh, refreshed every f steps (M&G amortise them; SOAP's f, same default 10),
    and at step 1; the factors themselves are updated every step;
  - no decay on the K-FAC matrices (as Muon's): --wd acts on the AdamW group.
"""
import sys

import jax
import jax.numpy as jnp
import optax

import data
import model

# ============================================================================ config

DEFAULTS = {  # flag: (value, or {size: value}; sources of the 45m and 150m values: data.SOURCES)
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("T", "O")),  # 150m: GN's micro-batch
    "grad_accum": ({"tiny": 2, "small": 8, "45m": 122, "150m": 305}, ("T", "O")),  # 150m: Muon's 40M
    "steps": ({"tiny": 4, "small": 30, "45m": 227, "150m": 1000}, ("T", "O")),
    "lr": ({"tiny": 0.03, "small": 0.03, "45m": 0.03, "150m": 0.03}, ("O", "O")),
    "schedule": ("constant", ("T", "O")),
    "schedules": ["constant", "warmup_constant", "warmup_cosine"],
    "wd": (0.0, ("T", "O")),
    "eval_every": ({"tiny": 2, "small": 5, "45m": 1, "150m": 1}, ("T", "O")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    p.flag("--damping", 1e-3, "lam: Tikhonov damping, factored over A and Gam", type=data.pos_float)
    p.flag("--momentum", 0.9, "mu: heavy-ball momentum on the preconditioned gradient",
           type=data.nonneg_float)
    p.flag("--stat-decay", 0.95, "decay: of the running averages of A and Gam (M&G's 0.95)",
           type=data.unit_float)
    p.flag("--precondition-frequency", 10, "f: steps between refreshes of the damped inverses",
           type=data.pos_int)
    p.flag("--adam-lr", {"tiny": 3e-3, "small": 1e-3, "45m": 0.01, "150m": 0.003},
           "peak lr of the AdamW group (wte, lm_head, 1-D): adamw.py's default at the size",
           type=data.pos_float)
    p.flag("--b1", 0.9, "AdamW beta1", type=data.unit_float)
    p.flag("--b2", 0.95, "AdamW beta2", type=data.unit_float)
    p.flag("--eps", 1e-8, "AdamW epsilon", type=data.pos_float)
    return data.parse_common(p, argv, "kfac")


# ============================================================================ maths

DENSE = ("wq", "wk", "wv", "wo", "w1", "w2")
A_OF = {"wq": "qkv", "wk": "qkv", "wv": "qkv", "wo": "wo", "w1": "w1", "w2": "w2"}  # wq wk wv: one input


def factors_and_grad(params, batches, key, cfg, n_chunks=1, on_micro=None):
    """Over K stacked micro-batches (K, B, T): the mean loss, its gradient (the data's targets),
    and each dense layer's A = mean a a^T and Gam = mean g g^T over the n_tok tokens, g the output
    gradient of sum_n CE(z_n, y^_n) with y^_n ~ softmax(z_n). Lists A[i][name], Gam[i][name]."""
    K = batches["inputs"].shape[0]
    chunks = jax.tree.map(lambda a: model.chunk_micro(a, n_chunks), batches)

    def micro(acc, xs):
        i, b = xs
        x_BT, y_BT = b["inputs"], b["targets"]
        B, T = x_BT.shape
        taps = [{n: jnp.zeros((B, T, p[n].shape[1]), jnp.float32) for n in DENSE} for p in params["h"]]
        z_BTV, vjp, ins = jax.vjp(lambda p, t: model.forward_taps(p, x_BT, cfg, t), params, taps,
                                  has_aux=True)
        p_BTV = jax.nn.softmax(z_BTV, -1)
        g_params = vjp(model.ce_grad_logits(p_BTV, y_BT, y_BT.size))[0]       # mean loss, data targets
        y_hat = jax.random.categorical(jax.random.fold_in(key, i), z_BTV)
        g_taps = vjp(model.ce_grad_logits(p_BTV, y_hat, 1))[1]                 # sum loss, sampled targets
        outer = lambda v: jnp.einsum("bti,btj->ij", v.astype(jnp.float32), v.astype(jnp.float32))
        A = [{A_OF[n]: outer(a[n]) for n in ("wq", "wo", "w1", "w2")} for a in ins]   # wk wv: wq's
        Gam = [{n: outer(g[n]) for n in DENSE} for g in g_taps]
        if on_micro is not None:
            jax.debug.callback(on_micro, i, K * n_chunks)
        loss = model.cross_entropy(z_BTV, y_BT)
        return jax.tree.map(jnp.add, acc, (loss, g_params, A, Gam)), None

    zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params), *factor_shapes(params))
    (loss, g, A, Gam), _ = jax.lax.scan(micro, zero, (jnp.arange(K * n_chunks), chunks))
    n = K * n_chunks
    n_tok = n * chunks["inputs"].shape[1] * chunks["inputs"].shape[2]
    return loss / n, jax.tree.map(lambda x: x / n, g), jax.tree.map(lambda x: x / n_tok, (A, Gam))


def factor_shapes(params):
    """Zeros of A (in x in, one per input: A_OF) and Gam (out x out, one per layer) of each block."""
    sq = lambda k: jnp.zeros((k, k), jnp.float32)
    return ([{A_OF[n]: sq(p[n].shape[0]) for n in DENSE} for p in params["h"]],
            [{n: sq(p[n].shape[1]) for n in DENSE} for p in params["h"]])


def damping(A, Gam, lam):
    """Factored Tikhonov damping of A (x) Gam: A's pi sqrt(lam) and Gam's sqrt(lam) / pi, with
    pi = sqrt((tr A / in) / (tr Gam / out))."""
    pi = jnp.sqrt((jnp.trace(A) / A.shape[0]) / jnp.maximum(jnp.trace(Gam) / Gam.shape[0], 1e-30))
    pi = jnp.clip(pi, 1e-6, 1e6)                      # a layer with Gam = 0 (no signal yet)
    return pi * jnp.sqrt(lam), jnp.sqrt(lam) / pi


def damped_inverse(eig, shift):
    """(M + shift I)^-1 from eig = (e, Q) = eigh(M), M symmetric PSD."""
    e, Q = eig
    return (Q / (jnp.maximum(e, 0.0) + shift)) @ Q.T


def damped_inverses(A, Gam, lam):
    """A^-1[i][n] = (A + pi sqrt(lam) I)^-1 and Gam^-1[i][n] = (Gam + sqrt(lam)/pi I)^-1 for every
    dense layer n of every block i: one eigh per factor (wq wk wv's shared A once)."""
    A_inv, Gam_inv = [], []
    for a, g in zip(A, Gam):
        eig = {k: jnp.linalg.eigh(M) for k, M in a.items()}
        shifts = {n: damping(a[A_OF[n]], g[n], lam) for n in DENSE}
        A_inv.append({n: damped_inverse(eig[A_OF[n]], shifts[n][0]) for n in DENSE})
        Gam_inv.append({n: damped_inverse(jnp.linalg.eigh(g[n]), shifts[n][1]) for n in DENSE})
    return A_inv, Gam_inv


def precondition(A_inv, grad_W, Gam_inv):
    """(A (x) Gam + damping)^-1 grad_W with W stored (in, out): A^-1 grad_W Gam^-1."""
    return A_inv @ grad_W @ Gam_inv


def make_optimizer(args):
    """The AdamW group (wte, lm_head, 1-D: model.muon_label's 'adam'), clipped by its own norm,
    zero on the K-FAC matrices; and the two lr schedules (K-FAC's, AdamW's)."""
    lr = model.make_schedule(args.schedule, args.lr, args.warmup, args.steps)
    adam_lr = model.make_schedule(args.schedule, args.adam_lr, args.warmup, args.steps)
    clip = optax.clip_by_global_norm(args.clip) if args.clip else optax.identity()
    adam = optax.chain(clip, optax.adamw(adam_lr, args.b1, args.b2, args.eps, weight_decay=args.wd))
    label = lambda path, x: "matrix" if model.muon_label(path, x) == "muon" else "adam"   # Muon's split
    labels = lambda params: jax.tree_util.tree_map_with_path(label, params)
    return optax.multi_transform({"adam": adam, "matrix": optax.set_to_zero()}, labels), lr


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg):
    """One K-FAC step on K = --grad-accum micro-batches."""
    adam, lr = make_optimizer(args)
    tick = data.ticker(args, "micro-batch chunk")

    def step(state, batches, t):
        params = state["params"]
        key = jax.random.fold_in(jax.random.key(args.seed), t)
        loss, g, (A, Gam) = factors_and_grad(params, batches, key, cfg, args.split, on_micro=tick)
        decay = jnp.minimum(1.0 - 1.0 / (t + 1), args.stat_decay)              # t + 1 = 1: the batch's own
        A, Gam = jax.tree.map(lambda old, new: decay * old + (1 - decay) * new,
                              (state["A"], state["Gam"]), (A, Gam))
        A_inv, Gam_inv = jax.lax.cond(t % args.precondition_frequency == 0,
                                    lambda: damped_inverses(A, Gam, args.damping),
                                    lambda: (state["A_inv"], state["Gam_inv"]))
        g_kfac = [{n: gi[n] for n in DENSE} for gi in g["h"]]
        c = jnp.minimum(1.0, args.clip / (optax.tree.norm(g_kfac) + 1e-12)) if args.clip else 1.0
        U = jax.tree.map(lambda ai, gw, gi: precondition(ai, c * gw, gi), A_inv, g_kfac, Gam_inv)
        mom = jax.tree.map(lambda m, u: args.momentum * m + u, state["mom"], U)
        updates, opt = adam.update(g, state["opt"], params)                    # zero on the K-FAC leaves
        for i, m in enumerate(mom):
            updates["h"][i] = {**updates["h"][i], **{n: -lr(t) * m[n] for n in DENSE}}
        new = {"params": optax.apply_updates(params, updates), "opt": opt, "A": A, "Gam": Gam,
               "A_inv": A_inv, "Gam_inv": Gam_inv, "mom": mom}
        return new, {"train_loss": loss, "lr": lr(t), "grad_norm": optax.tree.norm(g)}
    return step


# ============================================================================ loop

def init_state(args, cfg, params):
    A, Gam = factor_shapes(params)
    eye = lambda n: jnp.eye(n, dtype=jnp.float32)
    return {"params": params, "opt": make_optimizer(args)[0].init(params), "A": A, "Gam": Gam,
            "A_inv": [{n: eye(p[n].shape[0]) for n in DENSE} for p in params["h"]],
            "Gam_inv": [{n: eye(p[n].shape[1]) for n in DENSE} for p in params["h"]],
            "mom": [{n: jnp.zeros_like(p[n]) for n in DENSE} for p in params["h"]]}


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    run.train(init_state(args, cfg, params), make_step(args, cfg))


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
