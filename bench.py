"""Speed of the GN building blocks, in units of one gradient, measured in one run.

    python bench.py --size small            # writes a markdown table to stdout (and --out)

Each timing is the median of --repeats calls of a jitted function after one warm-up call, on the
same micro-batch. Ratios are what matter: absolute times on a shared machine are noisy.
  gradient        jit(value_and_grad(l o f)) on one micro-batch             (the unit)
  GGN-vp reused   one G v product with the linearisation reused, as CG reuses it:
                  (time of linearise + 11 chained products - linearise + 1) / 10
  inner step      Algorithm 1's inner gradient J^T (g0 + H0 J D) on a fresh micro-batch
  line-search fwd one forward loss on one micro-batch
  CG outer step   one gn_full --solver cg step (outer batch, CG, backtracking, line search)
"""
import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import gn_full
import model


def timeit(fn, *args, repeats):
    jax.block_until_ready(fn(*args))                      # compile and warm up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=sorted(model.CONFIGS), help="config (default small)")
    p.add_argument("--batch-size", type=data.pos_int, default=32, help="sequences per micro-batch (32)")
    p.add_argument("--repeats", type=data.pos_int, default=5, help="timed calls per entry (5)")
    p.add_argument("--out", default="", help="also write the table to this file")
    a = p.parse_args(argv)
    cfg = model.CONFIGS[a.size]
    params = model.init_params(cfg, jax.random.key(0))
    toks = np.asarray(jax.random.randint(jax.random.key(1), (200_000,), 0, cfg.vocab), np.uint16)
    batches = data.Batches(toks, a.batch_size, cfg.seq_len, "random", 0)
    b = jax.tree.map(jnp.asarray, batches.get(0))
    v = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    r = a.repeats
    rows = []

    grad = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)
    t_grad = timeit(grad, params, b, cfg, repeats=r)
    rows.append(("gradient (value_and_grad)", t_grad))

    def chained(k):
        @jax.jit
        def f(params, b, v):
            _, _, Gv = gn_full.gn_model(params, b, cfg)
            return jax.lax.fori_loop(0, k, lambda i, u: jax.tree.map(lambda x: x / (1 + jnp.abs(x).max()), Gv(u)), v)
        return f
    t1, t11 = (timeit(chained(k), params, b, v, repeats=r) for k in (1, 11))
    rows.append(("GGN-vector product, linearisation reused", (t11 - t1) / 10))
    rows.append(("linearise + 1 GGN-vector product", t1))

    inner = jax.jit(lambda p, D, b: gn_full.quad_model_grad(p, D, b, cfg))
    rows.append(("inner step: J^T (g0 + H0 J D), fresh micro-batch", timeit(inner, params, v, b, repeats=r)))
    fwd = jax.jit(lambda p, b: model.loss_fn(p, b, cfg))
    rows.append(("line-search forward (loss only)", timeit(fwd, params, b, repeats=r)))

    args = gn_full.parse(["--size", a.size, "--solver", "cg", "--batch-size", str(a.batch_size)])
    step = gn_full.make_step(args, cfg, None)
    state = {"params": params, "lam": jnp.float32(args.lam), "delta": jax.tree.map(jnp.zeros_like, params)}
    outer = jax.tree.map(jnp.asarray, batches.take(0, args.inner_steps + args.ls_batches))
    t_cg = timeit(lambda s, o: step(s, o, 0)[1], state, outer, repeats=max(1, r // 2))
    m = step(state, outer, 0)[1]
    rows.append((f"CG outer step ({args.inner_steps} micro-batches, {int(m['cg_iters'])} CG iters, "
                 f"{args.ls_batches} line-search batches x {args.ls_range + 2} evaluations)", t_cg))

    lines = [f"`python bench.py --size {a.size} --batch-size {a.batch_size}` on "
             f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.devices()[0].device_kind}",
             "", "| quantity | time (ms) | in gradients |", "|---|---|---|"]
    lines += [f"| {name} | {1e3 * t:.1f} | {t / t_grad:.2f} |" for name, t in rows]
    table = "\n".join(lines)
    print(table)
    if a.out:
        open(a.out, "w").write(table + "\n")


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
