"""The paper's transformer LM in plain JAX: f (params, tokens) -> logits and the loss l.

Architecture (natalieabreu/full-gauss-newton, EasyLM/models/llama/llama_model.py: LLaMA with
full-width QK-LayerNorm and a non-gated GELU MLP):
    h   = wte[tokens]                                   no position embedding
    h  += Attn(RMSNorm(h)),  h += MLP(RMSNorm(h))       pre-norm, per block
    Attn: q = LN(h Wq), k = LN(h Wk), v = h Wv          LayerNorm over the full width,
          interleaved RoPE (theta=1e4) on q, k             before the head split and RoPE
          softmax(q k^T / sqrt(hd) + causal) v Wo
    MLP : gelu_tanh(h W1) W2                            non-gated
    logits = RMSNorm(h) W_lm_head                       untied head, no biases anywhere
Init with r = initializer_range = 1.0: wte ~ N(0, r^2), every other matrix ~ N(0, r^2/fan_in),
norm scales 1, LayerNorm biases 0. Weights are stored (in, out), as flax kernels are.

The loss l is the mean token cross-entropy. The authors average per-sequence means; with no
padding mask every sequence has T tokens, so the two are identical.

Parameter paths are stable: params["wte"], params["h"][i] (one dict per block, with its own
norms), params["ln_f"], params["lm_head"]. Layerwise GN selects blocks by these exact keys.

Below f and l, the maths the methods share (each once, here): l's gradient and Hessian-vector
product in logit space, vectors as pytrees (tdot, axpy), means over chunked micro-batches, the
optimizers the methods share (the schedules, Muon with AdamW), and the GN family's steps of
Algorithm 1 but the model's gradient: the batch split, the inner optimizer and its lr, the inner
solve, the line search, the warm start and rejection, the step's metrics.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Config:
    d: int          # width
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int    # T
    vocab: int      # V
    init_range: float = 1.0     # the paper's initializer_range
    remat: bool = False         # recompute each block in the backward/transpose pass (memory)
    dtype: str = "float32"      # matmul compute dtype; "bfloat16" for accelerators

    @property
    def head_dim(self):
        return self.d // self.n_heads


CONFIGS = {
    "45m": Config(d=512, n_layers=4, n_heads=8, d_ff=2048, seq_len=1024, vocab=32000),
    "150m": Config(d=768, n_layers=12, n_heads=16, d_ff=3072, seq_len=1024, vocab=32000),
    # CPU experiments: 2.9M params, ~2M of them embedding + head.
    "small": Config(d=128, n_layers=4, n_heads=4, d_ff=512, seq_len=128, vocab=8192),
    # Tests: compiles in about a second.
    "tiny": Config(d=32, n_layers=2, n_heads=2, d_ff=64, seq_len=16, vocab=512),
}


def init_params(cfg: Config, key):
    """Parameters as a dict of fp32 arrays, initialised as the paper does (r = cfg.init_range)."""
    r, d = cfg.init_range, cfg.d
    keys = iter(jax.random.split(key, 2 + 6 * cfg.n_layers))

    def dense(fan_in, fan_out):
        return jax.random.normal(next(keys), (fan_in, fan_out), jnp.float32) * (r / math.sqrt(fan_in))

    def block():
        ln = lambda: {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}
        return {"ln_1": jnp.ones((d,)), "wq": dense(d, d), "wk": dense(d, d), "wv": dense(d, d),
                "wo": dense(d, d), "q_norm": ln(), "k_norm": ln(),
                "ln_2": jnp.ones((d,)), "w1": dense(d, cfg.d_ff), "w2": dense(cfg.d_ff, d)}

    return {"wte": jax.random.normal(next(keys), (cfg.vocab, d), jnp.float32) * r,
            "h": [block() for _ in range(cfg.n_layers)],
            "ln_f": jnp.ones((d,)),
            "lm_head": dense(d, cfg.vocab)}


def param_count(params):
    return sum(x.size for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- layers

def rms_norm(x, w, eps=1e-6):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + eps) * w).astype(x.dtype)


def layer_norm(x, p, eps=1e-6):
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean((x32 - mu) ** 2, -1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def rope(x_BTHD, theta=1e4):
    """Interleaved RoPE: the pair (2i, 2i+1) rotates by angle pos * theta^(-2i/hd)."""
    T, hd = x_BTHD.shape[1], x_BTHD.shape[3]
    freq = theta ** (-jnp.arange(0, hd, 2, dtype=jnp.float32) / hd)        # (hd/2,)
    ang_TF = jnp.arange(T, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(ang_TF)[None, :, None, :], jnp.sin(ang_TF)[None, :, None, :]
    x = x_BTHD.astype(jnp.float32).reshape(*x_BTHD.shape[:3], hd // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)
    return out.reshape(x_BTHD.shape).astype(x_BTHD.dtype)


def matmul(p, name, a):
    """The dense layer `name` of block p: a W in a's compute dtype."""
    return a @ p[name].astype(a.dtype)


def attention(p, x_BTD, cfg: Config, dense=matmul):
    B, T, D = x_BTD.shape
    H, hd = cfg.n_heads, cfg.head_dim
    dt = x_BTD.dtype
    q = layer_norm(dense(p, "wq", x_BTD), p["q_norm"]).reshape(B, T, H, hd)
    k = layer_norm(dense(p, "wk", x_BTD), p["k_norm"]).reshape(B, T, H, hd)
    v = dense(p, "wv", x_BTD).reshape(B, T, H, hd)
    q, k = rope(q), rope(k)
    s_BHTT = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((T, T), bool))
    s_BHTT = jnp.where(causal, s_BHTT, jnp.finfo(jnp.float32).min)
    a_BHTT = jax.nn.softmax(s_BHTT, axis=-1).astype(dt)
    o_BTD = jnp.einsum("bhqk,bkhd->bqhd", a_BHTT, v).reshape(B, T, D)
    return dense(p, "wo", o_BTD)


def block(p, x_BTD, cfg: Config, dense=matmul):
    """dense(p, name, a): each dense layer; kfac.py's records its input and output gradient."""
    x_BTD = x_BTD + attention(p, rms_norm(x_BTD, p["ln_1"]), cfg, dense)
    h_BTF = jax.nn.gelu(dense(p, "w1", rms_norm(x_BTD, p["ln_2"])), approximate=True)
    return x_BTD + dense(p, "w2", h_BTF)


# ----------------------------------------------------------------------------- f and l

def hidden(params, tokens_BT, cfg: Config):
    """The final normalised hidden states (B, T, d): everything in f before the head."""
    x_BTD = params["wte"][tokens_BT].astype(cfg.dtype)
    blk = jax.checkpoint(block, static_argnums=2) if cfg.remat else block
    for p in params["h"]:
        x_BTD = blk(p, x_BTD, cfg)
    return rms_norm(x_BTD, params["ln_f"])


def head(h_BTD, W_DV):
    """logits = h W, accumulated in fp32 whatever the compute dtype: bf16 logits would be rounded
    to 8 bits of mantissa, and p, the CE Hessian and every GN product would inherit it."""
    return jnp.matmul(h_BTD, W_DV.astype(h_BTD.dtype), preferred_element_type=jnp.float32)


def forward(params, tokens_BT, cfg: Config):
    """f: int tokens (B, T) -> fp32 logits (B, T, V)."""
    return head(hidden(params, tokens_BT, cfg), params["lm_head"])


def forward_taps(params, tokens_BT, cfg: Config, taps):
    """f with a tap on every dense layer of the blocks, for K-FAC (kfac.py): taps[i][name], zeros
    of the shape of block i's layer `name`'s output s, is added to s, so the gradient with respect
    to it is dl/ds; returns the logits and every layer's input a, ins[i][name]. No remat."""
    x_BTD, ins = params["wte"][tokens_BT].astype(cfg.dtype), []
    for p, tap in zip(params["h"], taps):
        seen = {}

        def dense(p, name, a, tap=tap, seen=seen):
            seen[name] = a
            return matmul(p, name, a) + tap[name].astype(a.dtype)
        x_BTD = block(p, x_BTD, cfg, dense)
        ins.append(seen)
    return head(rms_norm(x_BTD, params["ln_f"]), params["lm_head"]), ins


def cross_entropy(logits_BTV, targets_BT):
    """l: the mean over tokens of the softmax cross-entropy (fp32)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1))


def loss_fn(params, batch, cfg: Config):
    """l(f(params; inputs), targets) for a batch {"inputs", "targets"} of int32 (B, T)."""
    return cross_entropy(forward(params, batch["inputs"], cfg), batch["targets"])


# ----------------------------------------------------------------------------- l in logit space
# The GN family's maths: with p = softmax(z) per token and n_tok tokens, l = (1/n_tok) sum CE has
#     dl/dz = (p - onehot(y)) / n_tok,     d2l/dz2 = H = (diag(p) - p p^T) / n_tok  (per token).

def ce_grad_logits(p_BTV, y_BT, n_tok):
    """dl/dz for l = (1/n_tok) sum CE, from p = softmax(z): (p - onehot(y)) / n_tok."""
    return (p_BTV - jax.nn.one_hot(y_BT, p_BTV.shape[-1])) / n_tok


def ce_hvp_logits(p_BTV, u_BTV, n_tok):
    """H u per token, written out: (diag(p) - p p^T) u / n_tok = (p * u - p (p^T u)) / n_tok."""
    return (p_BTV * u_BTV - p_BTV * jnp.sum(p_BTV * u_BTV, -1, keepdims=True)) / n_tok


# ----------------------------------------------------------------------------- vectors as pytrees

tdot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
axpy = lambda a, x, y: jax.tree.map(lambda u, v: a * u + v, x, y)       # a x + y


# ----------------------------------------------------------------------------- many micro-batches

def chunk_rows(x_BT, n_chunks):
    """(B, ...) -> (n_chunks, B/n_chunks, ...), chunk j holding rows j, j+n_chunks, ...: memory is bounded
    by one chunk, and each chunk keeps the batch's sharding (B/n_chunks rows over the devices)."""
    return x_BT.reshape(x_BT.shape[0] // n_chunks, n_chunks, *x_BT.shape[1:]).swapaxes(0, 1)


def chunk_micro(x_KBT, n_chunks):
    """(K, B, ...) stacked micro-batches -> (K * n_chunks, B/n_chunks, ...) chunks, by chunk_rows."""
    K, B = x_KBT.shape[:2]
    return jax.vmap(lambda x: chunk_rows(x, n_chunks))(x_KBT).reshape(K * n_chunks, B // n_chunks, *x_KBT.shape[2:])


def mean_loss(params, batch, cfg: Config, n_chunks=1):
    """loss_fn computed in `n_chunks` equal chunks of rows: the same mean, less memory."""
    chunks = jax.tree.map(lambda a: chunk_rows(a, n_chunks), batch)
    return jnp.mean(jax.lax.map(lambda b: loss_fn(params, b, cfg), chunks))


def mean_loss_and_grad(params, batches, cfg: Config, n_chunks=1, on_micro=None):
    """Mean loss and gradient over K stacked micro-batches (K, B, T), each in `n_chunks` chunks,
    accumulated by lax.scan: memory is that of one chunk. on_micro(i, K * n_chunks) is a progress
    hook, called once per chunk."""
    K = batches["inputs"].shape[0]
    chunks = jax.tree.map(lambda a: chunk_micro(a, n_chunks), batches)

    def micro(acc, xs):
        i, b = xs
        loss, g = jax.value_and_grad(loss_fn)(params, b, cfg)
        if on_micro is not None:
            jax.debug.callback(on_micro, i, K * n_chunks)
        return jax.tree.map(jnp.add, acc, (loss, g)), None

    zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss, g), _ = jax.lax.scan(micro, zero, (jnp.arange(K * n_chunks), chunks))
    return loss / (K * n_chunks), jax.tree.map(lambda x: x / (K * n_chunks), g)


# ----------------------------------------------------------------------------- the optimizers the methods share

def make_schedule(kind, lr, warmup, steps):
    """The baselines' lr schedules, indexed by optimizer step (not micro-step); warmups start at
    0, the authors' init_lr (optimizers.py: constant_with_warmup, cosine)."""
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "warmup_constant":
        return optax.linear_schedule(0.0, lr, max(warmup, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), 0.0)


def muon_label(path, leaf):
    """Muon for the 2-D matrices inside the blocks, AdamW for wte, lm_head and every 1-D leaf."""
    return "muon" if path[0] == jax.tree_util.DictKey("h") and leaf.ndim == 2 else "adam"


MUON_NS = (3.4445, -4.7750, 2.0315), 5    # Newton-Schulz quintic (a, b, c) and its steps
MUON_DIMS = optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)   # W stored (in, out)


def muon_adamw(params, muon_lr, adam_lr, beta, b1, b2, eps, wd, clip):
    """Muon (optax.contrib.muon: Nesterov, no decay) on the blocks' 2-D matrices and AdamW on the
    rest, each group clipped by its own global norm (clip 0: off): muon.py's optimizer, and the GN
    scripts' inner one at unit lr. Returns it and the routing labels."""
    labels = jax.tree_util.tree_map_with_path(muon_label, params)
    got = jax.tree.leaves(labels)
    assert len(got) == len(jax.tree.leaves(params)) and set(got) <= {"muon", "adam"}, got   # every leaf, once
    clipped = lambda t: optax.chain(optax.clip_by_global_norm(clip) if clip else optax.identity(), t)
    # Only "muon" leaves reach optax's muon, all of them 2-D, so its own aux Adam receives nothing.
    muon = optax.contrib.muon(muon_lr, *MUON_NS, beta=beta, weight_decay=0.0, nesterov=True,
                              muon_weight_dimension_numbers=MUON_DIMS)
    adam = optax.adamw(adam_lr, b1, b2, eps, weight_decay=wd)
    return optax.multi_transform({"muon": clipped(muon), "adam": clipped(adam)}, labels), labels


# ----------------------------------------------------------------------------- the GN family
# Algorithm 1 (and Algorithm 2, and each layerwise block) at outer step t: (1) linearise f at
# theta_t; (2) N inner steps of an optimizer on the method's model of the loss, one fresh
# micro-batch each; (3) d = theta-hat - theta_t; (4) a line search on fresh micro-batches picks
# eta*; (5) theta_{t+1} = theta_t + eta* d; (6) the next solve starts from theta-hat with its
# optimizer state. The model's gradient is each method's own; the rest is here.

def inner_and_ls_batches(batches, N):
    """The data of steps (2) and (4): a GN step's (N + n_ls, B, T) micro-batches, the first N for
    the inner solve (gn_cg.py: the outer batch), the n_ls after them, fresh, for the line search."""
    return jax.tree.map(lambda a: a[:N], batches), jax.tree.map(lambda a: a[N:], batches)


def inner_optimizer(args, params):
    """Step (2)'s optimizer at unit lr (inner_solve scales its updates by inner_lr), and its
    routing labels: muon_adamw, or AdamW on every leaf. As the authors: Muon matrices get no
    weight decay; each group is clipped by its own norm."""
    if args.inner_opt == "adamw":
        clip = optax.clip_by_global_norm(args.clip) if args.clip else optax.identity()
        labels = jax.tree.map(lambda _: "adam", params)
        return optax.chain(clip, optax.adamw(1.0, args.inner_b1, args.inner_b2, weight_decay=args.wd)), labels
    return muon_adamw(params, 1.0, 1.0, args.beta, args.inner_b1, args.inner_b2, 1e-8, args.wd, args.clip)


def inner_lr(args, s, k):
    """Step (2)'s lr at inner step k of outer step s (0-based), from the global index s N + k
    (the authors' llama_train_gn.py, lr_sched; warmup counts outer steps, end lr 0)."""
    N, lr = args.inner_steps, args.lr
    if args.schedule == "constant":
        return jnp.asarray(lr, jnp.float32)
    if args.schedule == "constant_with_inner_cosine":
        peak = lr * jnp.minimum(1.0, 0.1 + 0.9 * s / args.warmup) if args.warmup else lr
        return peak * 0.5 * (1 + jnp.cos(jnp.pi * k / N))
    i, w, total = s * N + k, args.warmup * N, (args.schedule_steps or args.steps) * N   # global_cosine
    warm = 0.1 * lr + 0.9 * lr * i / max(w, 1)
    cos = lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip(i - w, 0, total - w) / max(total - w, 1)))
    return jnp.where(i < w, warm, cos)


def inner_solve(loss_model_grad, opt, theta, opt_state, batches, lr_of, on_step=None):
    """Steps (2) and (3): N inner steps (the paper's Algorithms 1 and 2, each layerwise block). At
    step k, on micro-batch k of the N stacked `batches`, loss_model_grad(theta, batch_k) -> (l(z0),
    gradient of the method's model of the loss at theta); the optax `opt` turns it into an update
    at unit lr, scaled by lr_of(k). Returns the final (theta, opt_state), and per step l(z0),
    the model gradient's norm and the lr."""
    N = batches["inputs"].shape[0]

    def one(carry, xs):
        theta, opt_state = carry
        k, b = xs
        loss0, grad = loss_model_grad(theta, b)
        updates, opt_state = opt.update(grad, opt_state, theta)
        lr = lr_of(k)
        theta = axpy(lr, updates, theta)
        if on_step is not None:
            jax.debug.callback(on_step, k, N)
        return (theta, opt_state), (loss0, optax.tree.norm(grad), lr)
    return jax.lax.scan(one, (theta, opt_state), (jnp.arange(N), batches))


def losses_along(theta, d, batches, etas, cfg: Config, n_chunks=1, on_eta=None):
    """Mean loss at theta + eta d over K stacked batches, for each eta of etas."""
    def loss_at(xs):
        i, eta = xs
        if on_eta is not None:
            jax.debug.callback(on_eta, i, len(etas))
        th = jax.tree.map(lambda a, b: a + eta * b, theta, d)
        return jnp.mean(jax.lax.map(lambda b: mean_loss(th, b, cfg, n_chunks), batches))
    return jax.lax.map(loss_at, (jnp.arange(len(etas)), etas))


def line_search(theta, d, batches, cfg: Config, ls_range, n_chunks=1, reject=True, on_eta=None):
    """Step (4), the line search (the authors' llama_train_gn.py, ls_range): eta* = the eta in
    (1/sqrt2)^i, i < ls_range, with the lowest mean loss at theta + eta d on the K stacked fresh
    batches. eta = 0 (theta itself) is evaluated too: when no eta > 0 beats it the step is
    rejected and eta* = 0 (reject=False: the best eta > 0 all the same, the authors' behaviour).
    With K = 0 batches there is no search: eta* = 1. Returns eta*, rejected and the metrics
    ls_loss (the best loss over eta > 0), ls_loss_eta0 (the loss at theta) and rejected."""
    if batches["inputs"].shape[0] == 0:
        return jnp.float32(1.0), jnp.bool_(False), {}
    etas = jnp.array([2 ** (-i / 2) for i in range(ls_range)] + [0.0], jnp.float32)
    losses = losses_along(theta, d, batches, etas, cfg, n_chunks, on_eta)
    i = jnp.argmin(losses[:-1])
    rejected = (losses[i] >= losses[-1]) & reject
    return (jnp.where(rejected, 0.0, etas[i]), rejected,
            {"ls_loss": losses[i], "ls_loss_eta0": losses[-1], "rejected": rejected})


def next_inner_state(args, state, eta, d, theta_hat, opt_state, rejected, opt_init):
    """Steps (5) and (6): theta_{t+1} = theta_t + eta* d, and the warm start: the next solve continues
    from the unscaled inner iterate theta_hat and its optimizer state; a rejected step (eta* = 0)
    restarts it from theta_t with a fresh state (opt_init(theta)) and halves the lr scale, which
    no later step raises again; --reset-start restarts every solve at theta_{t+1}."""
    theta_t = state["params"]
    theta_next = axpy(eta, d, theta_t)                          # theta_t if rejected
    if args.reset_start:
        theta_hat, opt_state = theta_next, opt_init(theta_next)
    else:
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(rejected, a, b), new, old)
        theta_hat, opt_state = keep(theta_t, theta_hat), keep(opt_init(theta_t), opt_state)
    return {"params": theta_next, "theta_hat": theta_hat, "opt": opt_state,    # theta_hat unscaled
            "lr_scale": state["lr_scale"] * jnp.where(rejected, 0.5, 1.0)}


def finish_gn_step(args, cfg, state, new, m, fwd, jvp, vjp, trained, d=None):
    """Every GN step ends alike: the EMA of the outer iterates (--ema), and the counts of
    micro-batch passes of the network (forward, JVP, VJP) and of the tokens the solve trained on,
    those of the (N, B, T) micro-batches `trained`. With the direction d (the inner solvers), also
    grad_norm |grad l(theta_t)| on the first inner micro-batch (one gradient: the mean over all N
    would cost N more backward passes), step_norm |eta* d| and inner_norm |d|."""
    if d is not None:
        g1 = mean_loss_and_grad(state["params"], jax.tree.map(lambda x: x[:1], trained), cfg, args.split)[1]
        m |= {"grad_norm": optax.tree.norm(g1), "step_norm": m["eta"] * optax.tree.norm(d),
              "inner_norm": optax.tree.norm(d)}
    if args.ema:
        new["ema"] = axpy(args.ema, axpy(-1.0, new["params"], state["ema"]), new["params"])
    return new, m | {"fwd_passes": fwd, "jvp_passes": jvp, "vjp_passes": vjp,
                     "tokens_trained": trained["inputs"].size}
