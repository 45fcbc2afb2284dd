"""Muon (Jordan et al. 2024) on the hidden matrices + AdamW on the rest, as the paper ran it.

One optimizer step on K = --grad-accum micro-batches (the authors' llama_train.py, optimizers.py);
g = mean micro-batch gradient.
Every leaf is labelled "muon" (each 2-D matrix of a block: wq wk wv wo w1 w2) or "adam" (wte,
lm_head and every 1-D norm scale/bias); each group is clipped by its own global norm c = --clip.
  muon, per matrix W (in, out), beta = --beta, t = 1, 2, ...:
    m     = beta m + (1 - beta) g                                   EMA momentum
    u     = beta m / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t)  optax's bias-corrected Nesterov
    X     = u / (||u||_F + 1e-8);  5 x  X <- a X + (b A + c A^2) X,  A = X X^T  (wide orientation)
    W     = W - lr_t sqrt(max(1, out/in)) X       (a, b, c) = (3.4445, -4.7750, 2.0315), no decay
  adam, per leaf p, with its own lr_adam_t = --adam-lr times the same schedule shape:
    p     = p - lr_adam_t ( m_hat / (sqrt(v_hat) + eps) + wd p )     AdamW(b1, b2, eps 1e-8)
At t = 1, u = g (1 + 2 beta)/(1 + beta), so the first Muon step is -lr scale NS5(g).
Paper defaults (45m): lr 0.01 constant for both groups, b1 0.9, b2 0.95, beta 0.95, wd 0, clip 1,
32 x 122 micro-batches (~4M tokens) per step, 227 steps. At 150m, Figure 1's 40M tokens per step
(305 x 128 x 1024); --help gives each default's source.
References: KellerJordan/Muon (muon.py); optax.contrib.muon (optax 0.2.8), which computes the above.

Differences from the authors' code (natalieabreu/full-gauss-newton, optimizers.py MuonOptimizerFactory):
  - 1-D parameters go to our explicit AdamW group (b1, b2, no Nesterov) instead of the aux Adam
    inside optax's muon (their b1, b2, but Nesterov in current optax); wd and lr are the same.
    So they are clipped with wte and lm_head; theirs were clipped with the Muon matrices;
  - the Adam lr is a separate flag --adam-lr (default = --lr, which is what they ran);
  - gradients are accumulated by lax.scan inside one jitted step rather than optax.MultiSteps;
  - no EMA of the weights: theirs, 0.9 per micro-step, averaged nothing in effect;
  - --clip 0 turns clipping off (theirs applied clip_by_global_norm(0), which zeroes the updates);
  - GPT-2 BPE and the data sources of data.py instead of C4 with the T5 tokenizer.
"""
import sys

import jax
import optax

import data
import model

# ============================================================================ config

DEFAULTS = {  # flag: (value, or {size: value}; sources of the 45m and 150m values: data.SOURCES)
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("T", "O")),  # 150m: GN's micro-batch
    "grad_accum": ({"tiny": 2, "small": 8, "45m": 122, "150m": 305}, ("T", "R")),  # 150m: 305 x 128 x 1024 = 40M
    "steps": ({"tiny": 4, "small": 30, "45m": 227, "150m": 1000}, ("T", "O")),  # 150m: the paper's ~864 to 3.25
    "lr": ({"tiny": 0.02, "small": 0.02, "45m": 0.01, "150m": 0.003}, ("A", "O")),
    "schedule": ("constant", ("T", "O")),
    "schedules": ["constant", "warmup_constant", "warmup_cosine"],
    "wd": (0.0, ("T", "O")),
    "eval_every": ({"tiny": 2, "small": 5, "45m": 1, "150m": 1}, ("T", "O")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    p.flag("--adam-lr", {"tiny": 3e-3, "small": 1e-3, "45m": 0.0, "150m": 0.0},
           "peak lr of the AdamW group (0: same as --lr)", type=data.nonneg_float)
    p.flag("--beta", 0.95, "Muon Nesterov momentum", type=data.unit_float)
    p.flag("--b1", 0.9, "AdamW beta1", type=data.unit_float)
    p.flag("--b2", 0.95, "AdamW beta2", type=data.unit_float)
    p.flag("--eps", 1e-8, "AdamW epsilon (Muon's NS normalisation eps stays 1e-8)", type=data.pos_float)
    args = data.parse_common(p, argv, "muon")
    args.adam_lr = args.adam_lr or args.lr
    return args


# ============================================================================ maths

def make_optimizer(args, params):
    """Muon on the blocks' matrices, AdamW (its own lr, --adam-lr) on the rest (model.muon_adamw,
    shared with the GN scripts' inner optimizer), its routing labels ('muon' for a 2-D matrix
    inside a block params["h"][i], 'adam' for wte, lm_head and 1-D leaves) and the lr schedule."""
    lr = model.make_schedule(args.schedule, args.lr, args.warmup, args.steps)
    adam_lr = model.make_schedule(args.schedule, args.adam_lr, args.warmup, args.steps)
    opt, labels = model.muon_adamw(params, lr, adam_lr, args.beta, args.b1, args.b2, args.eps, args.wd, args.clip)
    return opt, labels, lr


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg):
    """One optimizer step on the mean gradient of the step's --grad-accum micro-batches."""
    opt, _, lr = make_optimizer(args, data.param_shapes(cfg))
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
    run.log("routing:\n" + data.routing_table(make_optimizer(args, params)[1], params))
    run.train(init_state(args, cfg, params), make_step(args, cfg))


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
