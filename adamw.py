"""AdamW baseline (Loshchilov & Hutter 2019), as the paper's adam-template runs it.

One optimizer step on K = --grad-accum micro-batches x_k (the authors' llama_train.py):
    g     = clip( (1/K) sum_k grad l(f(theta; x_k)), c )         global-norm clip, c = --clip
    m     = b1 m + (1 - b1) g,     v = b2 v + (1 - b2) g^2
    theta = theta - lr_t ( m_hat / (sqrt(v_hat) + eps) + wd theta )   decoupled decay, every leaf
Paper defaults (45m, the templates): lr 0.01 constant, b1 0.9, b2 0.95, eps 1e-8, wd 0, clip 1,
32 x 122 micro-batches (~4M tokens) per step, 227 steps. At 150m, Figure 1's 40M tokens per step
(305 x 128 x 1024); --help gives each default's source.

Differences from the authors' code (natalieabreu/full-gauss-newton, llama_train.py):
  - gradients are accumulated by lax.scan inside one jitted step rather than optax.MultiSteps,
    so --steps, the schedule and the logs all count optimizer steps (theirs logged micro-steps);
  - no EMA of the weights: theirs (0.9 per micro-step) averaged nothing in effect;
  - GPT-2 BPE and the data sources of data.py instead of C4 with the T5 tokenizer.
"""
import sys

import jax
import optax

import data
import model

# ============================================================================ config

# Each flag: (its value at every size, or {size: value}; sources of the 45m and 150m values:
# data.SOURCES).
DEFAULTS = {
    "batch_size": ({"tiny": 8, "small": 32, "45m": 32, "150m": 128}, ("T", "O")),  # 150m: GN's micro-batch
    "grad_accum": ({"tiny": 2, "small": 8, "45m": 122, "150m": 305}, ("T", "R")),  # 150m: 305 x 128 x 1024 = 40M
    "steps": ({"tiny": 4, "small": 30, "45m": 227, "150m": 1500}, ("T", "O")),
    "lr": ({"tiny": 3e-3, "small": 1e-3, "45m": 0.01, "150m": 0.003}, ("T", "O")),  # 150m: the start's lr
    "schedule": ("constant", ("T", "O")),
    "schedules": ["constant", "warmup_constant", "warmup_cosine"],
    "wd": (0.0, ("T", "O")),
    "eval_every": ({"tiny": 2, "small": 5, "45m": 1, "150m": 1}, ("T", "O")),
}


def parse(argv=None):
    p = data.Parser(__doc__)
    data.common_flags(p, DEFAULTS)
    p.flag("--b1", 0.9, "Adam beta1", src=("T", "O"), type=data.unit_float)
    p.flag("--b2", 0.95, "Adam beta2", src=("T", "O"), type=data.unit_float)
    p.flag("--eps", 1e-8, "Adam epsilon", type=data.pos_float)
    return data.parse_common(p, argv, "adamw")


# ============================================================================ maths

def make_optimizer(args):
    """AdamW after the global-norm clip of the gradient, and its lr schedule."""
    lr = model.make_schedule(args.schedule, args.lr, args.warmup, args.steps)
    clip = optax.clip_by_global_norm(args.clip) if args.clip else optax.identity()
    return optax.chain(clip, optax.adamw(lr, args.b1, args.b2, args.eps, weight_decay=args.wd)), lr


# =============================================== the step (data.Run.train jits it)

def make_step(args, cfg):
    """One optimizer step on the mean gradient of the step's --grad-accum micro-batches."""
    opt, lr = make_optimizer(args)
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
    return {"params": params, "opt": make_optimizer(args)[0].init(params)}


def main(argv=None):
    args = parse(argv)
    cfg = data.model_config(args)
    run = data.Run(args, cfg)
    params = run.init_params()
    run.train(init_state(args, cfg, params), make_step(args, cfg))


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
