"""Speed and memory of every method, measured in one run; prints (and --out writes) markdown tables.

    python bench.py --size small                          # blocks, steps, loop, scaling: ~35 min
    python bench.py --sections util45m,memory,rss         # the 45m sections: about 25 min
    python bench.py --plan FILE                           # the estimated cost of run.sh full's runs

Absolute times on a shared machine are noisy; the ratios are what matter. Each table times its
entries in interleaved rounds (one call of each per round, after a warm-up call; the median over
--repeats rounds), so that a change of load hits every entry alike. Ratios of process CPU time are
given beside them: CPU time barely moves when another job takes our cores (wall time doubles).

The allocator. data.keep_freed_memory tells glibc's malloc to keep what it frees (every script
does so on import; FULLGN_MALLOPT=0 turns it off). The blocks and steps sections measure with it
and without it, each in subprocesses run in the order with, without, without, with (--alloc-rounds
pairs; every subprocess compiles and times --repeats rounds), and pool the rounds of each setting.

blocks   GN building blocks on one micro-batch, in gradients (jit(value_and_grad(l o f))): a G v
         product with the linearisation reused as CG reuses it, (linearise + 3 products - linearise
         + 1) / 2; one gn_cg.cg iteration likewise; the inner step gn_full.quad_model_grad; the
         matmul peak; each with the allocator setting and without, and the speed-up.
steps    each script's jitted step as its main() builds it (parse, state, make_step) with --micro
         micro-batches per phase, chained on device-resident batches at steps t = 0, 1, 2, ... (SOAP
         and K-FAC refresh their eigendecompositions at t = 0, 10, ...: the median is a step
         without; *_refresh rows refresh at every step): compile time, time per call with the
         allocator setting and without, tokens/s of all it consumes (line search included), and
         time per token over a bare loop's under the same setting (jit(value_and_grad) per
         micro-batch, one jitted optax.adamw update): adamw does the same work, so its excess is
         overhead.
loop     adamw.main for 6 steps: its step_time and whole loop iteration against the tight loop.
scaling  adamw and gn_full steps on 1, 2 and 4 simulated CPU devices (subprocesses), placed as Run.
util45m  45m forward+backward on --batch-45m x 1024, and its parts, against the matmul peak.
         (util45m, memory and rss run at --big, 45m by default; --big tiny is their smoke test)
memory   45m steps at --batch-size x 1024 (the paper's 32; Figure 1's 128 at --big 150m), one
         micro-batch per phase (CG with the paper's 50 iterations), never run: XLA's memory
         analysis of the compiled step; the smallest --split under --limit, and the largest
         micro-batch at --split 1.
rss      one real execution of the 45m gn_full step of `memory` in a subprocess, with the
         allocator setting and without: its peak RSS, and its RSS once the step's outputs are freed.

Model flops per token: fp32 matmuls, 2 per multiply-add (not norms, softmax, gelu). With N = L
(4 d^2 + 2 d d_ff) + d V matmul parameters (wte is a gather), training costs 6 N + 6 L T d, the
last term QK^T and AV forward and backward over the causal half of the scores. XLA computes the
whole masked square, 6 N + 12 L T d: we count the useful flops, as MFU does.

Page faults: by default glibc's malloc maps every buffer over 32 MiB afresh (at small one
micro-batch's logits are 128 MiB) and unmaps it on free, so the kernel zeroes fresh pages on every
call, and kernel time is a large share of CPU time. data.keep_freed_memory removes that; so does
LD_PRELOAD of tcmalloc (Debian libtcmalloc-minimal4), which needs a system package. glibc's
mmap_threshold alone cannot: glibc caps it at 32 MiB, below those buffers.
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adamw
import data
import gn_full
import gn_cg
import gn_layerwise
import gn_proxlinear
import kfac
import model
import muon
import soap

SCRIPTS = {  # step: (script, its flags; {K} micro-batches per phase, {cg} CG iterations)
    "adamw": (adamw, "--grad-accum {K}"),
    "muon": (muon, "--grad-accum {K}"),
    "soap": (soap, "--grad-accum {K}"),
    "gn_full": (gn_full, "--inner-steps {K} --ls-batches 1"),
    "gn_cg": (gn_cg, "--outer-batches {K} --ls-batches 1 --cg-iters {cg}"),
    "gn_layerwise": (gn_layerwise, "--inner-steps {K} --ls-batches 1"),
    "gn_proxlinear": (gn_proxlinear, "--inner-steps {K}"),       # the paper's default: no line search
    "kfac": (kfac, "--grad-accum {K}"),
    # every call refreshes the eigendecompositions, which the rows above do one step in 10
    "soap_refresh": (soap, "--grad-accum {K} --precondition-frequency 1"),
    "kfac_refresh": (kfac, "--grad-accum {K} --precondition-frequency 1"),
}
METHODS = {m.__name__: m for m in (adamw, muon, soap, gn_full, gn_cg, gn_layerwise, gn_proxlinear, kfac)}
T_START = time.perf_counter()


def say(msg):
    print(f"[bench {time.perf_counter() - T_START:4.0f}s] {msg}", file=sys.stderr, flush=True)


def timed_rounds(fns, repeats):
    """Wall, process-CPU and kernel (sys) seconds of each zero-argument call, in interleaved
    rounds after a warm-up call: {"wall": {name: [seconds per round]}, "cpu": ..., "kernel": ...}."""
    for f in fns.values():
        jax.block_until_ready(f())                        # compile and warm up
    times = {m: {k: [] for k in fns} for m in ("wall", "cpu", "kernel")}
    for r in range(repeats):
        say(f"  round {r + 1}/{repeats}")
        for k, f in fns.items():
            t0, c0, k0 = time.perf_counter(), time.process_time(), os.times().system   # k0: 10 ms ticks
            jax.block_until_ready(f())
            times["wall"][k].append(time.perf_counter() - t0)
            times["cpu"][k].append(time.process_time() - c0)
            times["kernel"][k].append(os.times().system - k0)
    return times


def medians(times):
    """{measure: {name: median}} of timed_rounds' lists (pooled over processes by allocator())."""
    return {m: {k: statistics.median(v) for k, v in ts.items()} for m, ts in times.items()}


def rounds(fns, repeats):
    """Median wall, process-CPU and kernel seconds of each call, over interleaved rounds."""
    t = medians(timed_rounds(fns, repeats))
    return t["wall"], t["cpu"], t["kernel"]


def train_flops(cfg):
    """Model flops of one training token (see the docstring)."""
    n = cfg.n_layers * (4 * cfg.d ** 2 + 2 * cfg.d * cfg.d_ff) + cfg.d * cfg.vocab
    return 6 * n + 6 * cfg.n_layers * cfg.seq_len * cfg.d


PEAK_N = 4096


def matmul_peak(n=PEAK_N):
    a = jax.random.normal(jax.random.key(0), (n, n))
    dot = jax.jit(jnp.dot)
    return lambda: dot(a, a), 2 * n ** 3


def token_batches(cfg, batch_size, k):
    """k stacked (B, T) micro-batches of random tokens: the cost does not depend on the text."""
    toks = np.asarray(jax.random.randint(jax.random.key(1), (200_000,), 0, cfg.vocab), np.uint16)
    return data.Batches(toks, batch_size, cfg.seq_len, "random", 0).take(0, k)


def build(name, flags):
    """Script `name`'s jitted step as its main() builds it, from the script's own parse(flags),
    make_step and init_state. Returns cfg, the step, init (params -> initial state) and the
    micro-batches of one call."""
    script = SCRIPTS[name][0]
    args = script.parse(flags.split())
    cfg = data.model_config(args)
    step = jax.jit(script.make_step(args, cfg))
    return cfg, step, lambda p: script.init_state(args, cfg, p), data.micro_per_step(args)


def compiled_step(name, flags, batch_size, mesh):
    """Script `name`'s step compiled ahead of time, its state and batches placed on the mesh as
    Run.train places them, as a zero-argument call that feeds each new state to the next call.
    Also returns its compile time (lower + compile) and micro-batches per call."""
    cfg, step, init, micro = build(name, flags)
    state = [data.replicate(init(model.init_params(cfg, jax.random.key(0))), mesh)]
    batches = data.shard_batch(token_batches(cfg, batch_size, micro), mesh, batch_axis=1)
    t0 = time.perf_counter()
    compiled = step.lower(state[0], batches, 0).compile()
    t = [0]                                               # the loop's step: 0, 1, 2, ... as in a run

    def call():
        state[0] = compiled(state[0], batches, t[0])[0]
        t[0] += 1
        return state[0]
    return call, {"micro": micro, "compile": time.perf_counter() - t0}


def peak_bytes(compiled):
    """XLA's peak memory of a compiled function: arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def memory_flags(name, batch_size, split, size="45m"):
    return f"--size {size} --batch-size {batch_size} --split {split} " + SCRIPTS[name][1].format(K=1, cg=50)


# ============================================================================ sections

def block_times(a):
    """The blocks section's raw times (timed_rounds) in this process."""
    cfg = model.CONFIGS[a.size]
    params = model.init_params(cfg, jax.random.key(0))
    b = jax.tree.map(lambda x: jnp.asarray(x[0]), token_batches(cfg, a.batch_size, 1))
    v = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
    grad = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)
    inner = jax.jit(lambda p, D, b: gn_full.quad_model_grad(p, D, b, cfg))
    fwd = jax.jit(lambda p, b: model.loss_fn(p, b, cfg))

    @jax.jit
    def products(params, b, v, k):
        """One linearisation, then k chained G v (normalised to stay finite); k traced: one compile."""
        Gv = gn_cg.gn_model(params, b, cfg)[2]
        norm = lambda u: jax.tree.map(lambda x: x / (1 + jnp.abs(x).max()), u)
        return jax.lax.fori_loop(0, k, lambda i, u: norm(Gv(u)), v)

    @jax.jit
    def cg(params, b, v, tol):
        """One linearisation, then 3 CG iterations at tol 0, or 1 at tol inf (it stops at once)."""
        _, g, Gv = gn_cg.gn_model(params, b, cfg)
        return gn_cg.cg(lambda u: model.axpy(0.01, u, Gv(u)), g, v, 3, tol=tol, eps=0.0)[0]

    peak = matmul_peak()[0]
    say(f"blocks: compiling, then {a.repeats} rounds")
    return {}, timed_rounds({"peak": peak, "grad": lambda: grad(params, b, cfg),
                             "p1": lambda: products(params, b, v, 1), "p3": lambda: products(params, b, v, 3),
                             "cg1": lambda: cg(params, b, v, jnp.inf), "cg3": lambda: cg(params, b, v, 0.0),
                             "inner": lambda: inner(params, v, b), "fwd": lambda: fwd(params, b)}, a.repeats)


NAME = {True: "with", False: "without"}      # the allocator setting (data.keep_freed_memory)


def blocks_table(a, pooled):
    """The blocks table, with the allocator setting and without (where both were measured)."""
    cfg, flops = model.CONFIGS[a.size], 2 * PEAK_N ** 3
    t = {on: medians(r[1]) for on, r in pooled.items()}
    for x in t.values():
        for m in ("wall", "cpu"):
            x[m]["product"], x[m]["cg"] = (x[m]["p3"] - x[m]["p1"]) / 2, (x[m]["cg3"] - x[m]["cg1"]) / 2
    ons, both = list(t), len(t) == 2
    lines = ["| quantity | " + " | ".join(f"{NAME[on]} (ms)" for on in ons) + (" | speed-up" if both else "")
             + "".join(f" | in gradients, {NAME[on]}" for on in ons) + f" | in gradients, CPU time, {NAME[ons[0]]} |",
             "|---|" + "---|" * (2 * len(ons) + both + 1)]
    for name, k in [("gradient (value_and_grad)", "grad"),
                    ("GGN-vector product, linearisation reused (as CG reuses it)", "product"),
                    ("one CG iteration (G v + lam v and the vector ops)", "cg"),
                    ("linearise + 1 GGN-vector product", "p1"),
                    ("inner step of Algorithm 1: J^T (g0 + H0 J D) on a fresh micro-batch", "inner"),
                    ("line-search forward (loss only)", "fwd"),
                    ("matmul peak: 4096^2 fp32 jnp.dot", "peak")]:
        w = {on: t[on]["wall"] for on in ons}
        cells = [name] + [f"{1e3 * w[on][k]:.1f}" for on in ons]
        cells += [f"**{w[False][k] / w[True][k]:.2f}x**"] if both else []
        cells += [f"{w[on][k] / w[on]['grad']:.2f}" for on in ons]
        cells += [f"{t[ons[0]]['cpu'][k] / t[ons[0]]['cpu']['grad']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    said = []
    for on in ons:
        wall, cpu, kernel = t[on]["wall"], t[on]["cpu"], t[on]["kernel"]
        share = train_flops(cfg) * a.batch_size * cfg.seq_len / wall["grad"] / (flops / wall["peak"])
        said.append(f"{NAME[on]} the allocator setting the gradient's model flops run at "
                    f"**{100 * share:.0f}%** of the matmul peak ({flops / wall['peak'] / 1e9:.0f} GFLOP/s) "
                    f"and the kernel takes {100 * kernel['grad'] / cpu['grad']:.0f}% of its CPU time")
    said = "; ".join(said)
    return lines + ["", f"The gradient costs {train_flops(cfg) / 1e6:.2f} M model flops per token. "
                    f"{said[0].upper()}{said[1:]} (page faults: see the docstring)."]


def step_times(a, names):
    """Raw times (timed_rounds) of each named step (SCRIPTS, "gradient", "bare") on this
    process's devices, and each step's {micro, compile}."""
    mesh = data.make_mesh()
    size = f"--size {a.size} --batch-size {a.batch_size} --split {a.split} "
    cfg = model.CONFIGS[a.size]
    params = data.replicate(model.init_params(cfg, jax.random.key(0)), mesh)
    stacked = token_batches(cfg, a.batch_size, a.micro)
    mbs = [data.shard_batch({k: x[i] for k, x in stacked.items()}, mesh) for i in range(a.micro)]
    grad = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)
    opt = optax.adamw(1e-3, 0.9, 0.95)

    @jax.jit
    def update(params, opt_state, grads):
        g = jax.tree.map(lambda *gs: sum(gs) / len(gs), *grads)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    bare_state = [params, data.replicate(opt.init(params), mesh)]      # placed once: no retrace

    def bare():
        bare_state[:] = update(*bare_state, [grad(bare_state[0], b, cfg)[1] for b in mbs])
        return bare_state[0]
    fns = {"gradient": lambda: grad(params, mbs[0], cfg), "bare": bare}
    info = {"gradient": {"micro": 1}, "bare": {"micro": a.micro}}
    for name in names:
        if name in SCRIPTS:
            say(f"steps: compiling {name}")
            flags = size + SCRIPTS[name][1].format(K=a.micro, cg=2)
            fns[name], info[name] = compiled_step(name, flags, a.batch_size, mesh)
    say(f"steps: timing {', '.join(names)}")
    return {k: info[k] for k in names}, timed_rounds({k: fns[k] for k in names}, a.repeats)


def steps_table(a, pooled):
    """The steps table, with the allocator setting and without (where both were measured); time
    per token against the bare loop's under the same setting."""
    t = {on: medians(r[1]) for on, r in pooled.items()}
    ons, both = list(t), len(t) == 2
    info = pooled[ons[0]][0]
    tokens = a.batch_size * model.CONFIGS[a.size].seq_len
    per_token = lambda on, m, k: t[on][m][k] / (info[k]["micro"] * tokens)
    vs_bare = lambda on, m, k: (f"{per_token(on, m, k) / per_token(on, m, 'bare'):.3f}"
                                if "bare" in info else "-")
    first = NAME[ons[0]]
    lines = ["| step | micro-batches per call | compile (s) | "
             + " | ".join(f"time per call, {NAME[on]} (s)" for on in ons) + (" | speed-up" if both else "")
             + f" | in gradients, {first} | tokens/s, {first} | "
             + " | ".join(f"time per token vs bare loop, {NAME[on]}" for on in ons) + f" | same, CPU time, {first} |",
             "|---|---|---|" + "---|" * (2 * len(ons) + both + 3)]
    for k, r in info.items():
        w = {on: t[on]["wall"][k] for on in ons}
        cells = [k, r["micro"], f"{statistics.median(r['compile']):.1f}" if "compile" in r else "-"]
        cells += [f"{w[on]:.3f}" for on in ons] + ([f"**{w[False] / w[True]:.2f}x**"] if both else [])
        cells += [f"{w[ons[0]] / t[ons[0]]['wall']['gradient']:.2f}" if "gradient" in info else "-",
                  f"{info[k]['micro'] * tokens / w[ons[0]]:,.0f}"]
        cells += [vs_bare(on, "wall", k) for on in ons] + [vs_bare(ons[0], "cpu", k)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def in_subprocess(argv, on, env=None):
    """The JSON last line of `python bench.py ARGV` run with the allocator setting on or off
    (FULLGN_MALLOPT=0), checked to have taken effect there."""
    out = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, check=True,
                         env=dict(os.environ, **(env or {}), FULLGN_MALLOPT=str(int(on)))).stdout
    r = json.loads(out.splitlines()[-1])
    if r["mallopt"] != on:
        raise RuntimeError(f"the allocator setting did not take effect in the subprocess (asked {on})")
    return r


def worker(a, section, on, env=None):
    """Section `section`'s (info, raw times) from a subprocess, with the allocator setting on or
    off."""
    r = in_subprocess(["--worker", section, "--size", a.size, "--batch-size", str(a.batch_size),
                       "--split", str(a.split), "--micro", str(a.micro), "--repeats", str(a.repeats),
                       "--steps", a.steps], on, env)
    return r["info"], r["times"]


def allocator(a, section):
    """Section's times with glibc told to keep its memory (data.keep_freed_memory) and without,
    each in its own subprocess, in the order with, without, without, with, ... (--alloc-rounds
    of each), so that a drift of the machine's load hits both alike; at --alloc-rounds 0, in this
    process under its own setting. Returns {on: (info, times)}, the rounds of a setting's
    subprocesses pooled, each step's compile times listed."""
    if a.alloc_rounds == 0:
        info, times = block_times(a) if section == "blocks" else step_times(a, a.steps.split(","))
        return {data.MALLOPT: ({k: r | ({"compile": [r["compile"]]} if "compile" in r else {})
                                for k, r in info.items()}, times)}
    pooled = {}
    for i in range(2 * a.alloc_rounds):
        on = i % 4 in (0, 3)
        say(f"{section}: subprocess {i + 1}/{2 * a.alloc_rounds}, allocator setting {'on' if on else 'off'}")
        info, times = worker(a, section, on)
        if on not in pooled:
            pooled[on] = ({k: r | ({"compile": []} if "compile" in r else {}) for k, r in info.items()},
                          {m: {k: [] for k in ts} for m, ts in times.items()})
        for k, r in info.items():
            if "compile" in r:
                pooled[on][0][k]["compile"].append(r["compile"])
        for m, ts in times.items():
            for k, v in ts.items():
                pooled[on][1][m][k] += v
    return dict(sorted(pooled.items(), reverse=True))         # with, then without


def loop(a):
    flags = f"--size {a.size} --batch-size {a.batch_size} --split {a.split} --grad-accum {a.micro}"
    call = compiled_step("adamw", flags, a.batch_size, data.make_mesh())[0]
    say("loop: tight loop of the adamw step")
    before = rounds({"t": call}, a.repeats)[0]["t"]
    stamps, write = [], data.Run._write     # one metrics row per step: the stamps time whole iterations
    data.Run._write = lambda self, row: (stamps.append(time.perf_counter()), write(self, row))
    with tempfile.TemporaryDirectory() as out:
        say("loop: adamw.main for 6 steps (its log goes to stderr)")
        try:
            with contextlib.redirect_stdout(sys.stderr):
                adamw.main(flags.split() + ["--start", "none", "--steps", "6", "--eval-every", "100",
                                            "--eval-batches", "1",
                                            "--eval-batch-size", str(a.batch_size), "--out", out])
        finally:
            data.Run._write = write
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    say("loop: tight loop again")
    t = (before + rounds({"t": call}, a.repeats)[0]["t"]) / 2
    step_time = statistics.median(r["step_time"] for r in rows if 2 <= r["step"] <= 5)
    iteration = statistics.median(np.diff(stamps)[1:5])    # stamps: step 0 (eval), then steps 1..6
    return ["| adamw step | time (s) | overhead |", "|---|---|---|",
            f"| tight loop of the jitted step (mean of the medians before and after) | {t:.3f} | - |",
            f"| adamw.main: step_time (step call + metrics fetch) | {step_time:.3f} | "
            f"**{100 * (step_time / t - 1):+.1f}%** |",
            f"| adamw.main: whole iteration (batch, step, metrics, log) | {iteration:.3f} | "
            f"**{100 * (iteration / t - 1):+.1f}%** |"]


def scaling(a):
    lines = ["| devices | adamw tok/s | gn_full tok/s |", "|---|---|---|"]
    for n in map(int, a.devices.split(",")):
        say(f"scaling: subprocess with {n} simulated devices")
        flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        info, times = worker(argparse.Namespace(**vars(a) | {"steps": "adamw,gn_full"}), "steps", data.MALLOPT,
                             {"XLA_FLAGS": flags.strip()})
        t, tokens = medians(times)["wall"], a.batch_size * model.CONFIGS[a.size].seq_len
        lines.append(f"| {n} | {info['adamw']['micro'] * tokens / t['adamw']:,.0f} | "
                     f"{info['gn_full']['micro'] * tokens / t['gn_full']:,.0f} |")
    return lines + ["", f"The simulated devices share the {os.cpu_count()} cores."]


def util45m(a):
    cfg = model.CONFIGS[a.big]
    B, T, d, L = a.batch_45m, cfg.seq_len, cfg.d, cfg.n_layers
    params = model.init_params(cfg, jax.random.key(0))
    b = jax.tree.map(lambda x: jnp.asarray(x[0]), token_batches(cfg, B, 1))
    h = jax.jit(model.hidden, static_argnums=2)(params, b["inputs"], cfg)
    r = jax.random.normal(jax.random.key(2), h.shape)
    grad = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)
    blocks = jax.jit(jax.grad(lambda p, x: jnp.vdot(model.hidden(p, x, cfg), r)))
    attn = jax.jit(jax.grad(lambda p, x: jnp.vdot(model.attention(p, x, cfg), r), (0, 1)))
    peak, peak_flops = matmul_peak()
    say(f"util45m: {a.big} fwd+bwd on {B} x {T}, compiling, then {a.repeats} rounds")
    t = rounds({"peak": peak, "grad": lambda: grad(params, b, cfg),
                "blocks": lambda: blocks(params, b["inputs"]), "attn": lambda: attn(params["h"][0], h)},
               a.repeats)[0]
    lines = [f"| {a.big}, {B} x {T} tokens | time (s) | model GFLOP/s | % of matmul peak |", "|---|---|---|---|",
             f"| matmul peak: 4096^2 fp32 jnp.dot | {t['peak']:.3f} | {peak_flops / t['peak'] / 1e9:.0f} "
             "| 100 |"]
    for name, k, flops in [("fwd+bwd: value_and_grad of the loss", "grad", train_flops(cfg)),
                           (f"{L} blocks fwd+bwd (embedding to final norm)", "blocks",
                            L * (6 * (4 * d * d + 2 * d * cfg.d_ff) + 6 * T * d)),
                           ("one attention fwd+bwd (projections, norms, RoPE, T x T)", "attn",
                            24 * d * d + 6 * T * d)]:
        rate = flops * B * T / t[k]
        lines.append(f"| {name} | {t[k]:.2f} | {rate / 1e9:.0f} | "
                     f"**{100 * rate / (peak_flops / t['peak']):.0f}** |")
    return lines


def analysed_gib(name, batch_size, split, size="45m"):
    """The step's peak memory by XLA's analysis of its compiled form, from abstract inputs."""
    cfg, step, init, micro = build(name, memory_flags(name, batch_size, split, size))
    state = jax.eval_shape(lambda: init(model.init_params(cfg, jax.random.key(0))))
    tok = jax.ShapeDtypeStruct((micro, batch_size, cfg.seq_len), jnp.int32)
    return peak_bytes(step.lower(state, {"inputs": tok, "targets": tok}, 0).compile()) / 2 ** 30


def memory(a):
    T, B = model.CONFIGS[a.big].seq_len, a.batch_size
    lines = [f"| step ({a.big}, {B} x {T}, 1 micro-batch per phase) | --split 4 (GiB) | --split 1 (GiB) | "
             f"fits {a.limit:g} GiB at {B} x {T} with | largest micro-batch at --split 1 |",
             "|---|---|---|---|---|"]
    for name in [n for n in a.steps.split(",") if n in SCRIPTS and not n.endswith("_refresh")]:  # (same memory)
        say(f"memory: {name}")
        gib = {s: analysed_gib(name, B, s, a.big) for s in (4, 1)}
        fit, s = next((s for s in (1, 4) if gib[s] <= a.limit), None), 4
        while fit is None and s < B and gib[s] < 0.9 * gib[1]:     # while splitting still helps
            s *= 2
            gib[s] = analysed_gib(name, B, s, a.big)
            fit = s if gib[s] <= a.limit else None
        largest = B if gib[1] <= a.limit else next(
            (b for b in (64, 32, 16, 8, 4, 2, 1) if b < B and analysed_gib(name, b, 1, a.big) <= a.limit), 0)
        fits = f"--split {fit} ({gib[fit]:.1f} GiB)" if fit else f"none (--split {s}: {gib[s]:.1f} GiB)"
        lines.append(f"| {name} | {gib[4]:.1f} | {gib[1]:.1f} | {fits} | {largest} x {T} |")
    return lines


def rss(a):
    lines = []
    for on in (True, False):
        say(f"rss: a subprocess runs the {a.big} gn_full step at 32 x T, --split 4 (minutes at 45m), "
            f"allocator setting {'on' if on else 'off'}")
        r = in_subprocess(["--rss-worker", "--big", a.big], on)
        own = r["peak"] - r["before"] + r["args"]       # the step's own peak, its arguments included
        lines.append(
            f"- {'with' if on else 'without'} the allocator setting: {a.big} gn_full step at 32 x T, --split 4, "
            f"1 inner step, 1 line-search batch: XLA's analysis {r['analysis']:.2f} GiB; the process's RSS "
            f"{r['before']:.2f} GiB before the step (runtime, params, state, batches), peak "
            f"**{r['peak']:.2f} GiB**, {r['after']:.2f} GiB once the step's outputs are freed; the step's own "
            f"peak (peak - before + arguments) {own:.2f} GiB = **{100 * (own / r['analysis'] - 1):+.0f}%** "
            "over the analysis.")
    return lines


def rss_worker(size):
    cfg, step, init, micro = build("gn_full", memory_flags("gn_full", 32, 4, size))
    state = init(model.init_params(cfg, jax.random.key(0)))
    batches = jax.tree.map(jnp.asarray, token_batches(cfg, 32, micro))
    compiled = step.lower(state, batches, 0).compile()
    m = compiled.memory_analysis()
    rss_now = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    before = rss_now()
    out = jax.block_until_ready(compiled(state, batches, 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # ru_maxrss is in KiB
    del out
    print(json.dumps({"analysis": peak_bytes(compiled) / 2 ** 30, "args": m.argument_size_in_bytes / 2 ** 30,
                      "before": before / 2 ** 30, "peak": peak / 2 ** 30, "after": rss_now() / 2 ** 30,
                      "mallopt": data.MALLOPT}))


# ============================================================================ main

SECTIONS = {"blocks": ("GN building blocks, in gradients", lambda a: blocks_table(a, allocator(a, "blocks"))),
            "steps": ("Each script's step", lambda a: steps_table(a, allocator(a, "steps"))),
            "loop": ("Script-loop overhead", loop),
            "scaling": ("Device scaling (simulated CPU devices)", scaling),
            "util45m": ("Hardware utilisation at --big (45m)", util45m),
            "memory": ("Memory at --big without running (XLA's compiled memory analysis)", memory),
            "rss": ("Memory analysis at --big against a real run", rss)}


# ---------------------------------------------------------------- plan: the cost of run.sh full

# Measured on one H100 80GB at 45m, 32 x 1024 micro-batches (docs/configs-and-data.md's H100
# table): an AdamW step (122 gradients) 4.07 s in bf16 and 7.32 s in TF32; `--sections blocks` in
# TF32: an inner step of Algorithm 1 costs 1.72 gradients, a line-search (or eval) forward 0.36.
H100_TOKENS_PER_S = {"bfloat16": 3_997_696 / 4.07, "tf32": 3_997_696 / 7.32}
INNER, FORWARD = 1.72, 0.36
C4_TRAIN_TOKENS = data.C4_TOTALS["train"] * 150e6   # ~150M GPT-2 tokens a shard (data.py's estimate)


def run_cost(script, argv):
    """One planned run of `script` with argv (its lr and target, which do not change the cost,
    dropped): its parsed args, config, steps, train and line-search tokens, and its cost in
    gradient-equivalent tokens."""
    drop = {i + d for i, x in enumerate(argv) if x in ("--lr", "--target-loss") for d in (0, 1)}
    args = METHODS[script].parse([x for i, x in enumerate(argv) if i not in drop])
    cfg = data.model_config(args)
    T, steps = cfg.seq_len, args.steps
    tok = args.batch_size * T                                   # tokens per micro-batch
    if script in ("adamw", "muon", "soap"):
        train, ls, grads = args.grad_accum * tok, 0, args.grad_accum * tok
    else:   # layerwise: L + 2 blocks, each solved by inner steps through about half the network
        blocks = (cfg.n_layers + 2) / 2 if script == "gn_layerwise" else 1
        train, ls = args.inner_steps * tok, args.ls_batches * tok
        grads = train * INNER * blocks + ls * (args.ls_range + 1) * FORWARD   # eta = 0 included
    evals = steps // args.eval_every * args.eval_batches * args.eval_batch_size * T * FORWARD
    return args, cfg, steps, steps * train, steps * ls, steps * grads + evals


def plan(path):
    """The table of run.sh full --dry-run: every planned run (lines FIGURE<TAB>DIR<TAB>SCRIPT
    ARGS) with its tokens, passes of C4 and estimated H100-hours, and the totals per figure."""
    rows, totals = [], {}
    ref = train_flops(model.CONFIGS["45m"])

    def add(fig, tokens, hours):
        t, h = totals.get(fig, (0, 0))
        totals[fig] = (t + tokens, h + hours)
    for line in open(path):
        fig, run, command = line.rstrip("\n").split("\t")
        script, *argv = command.split()
        args, cfg, steps, train, ls, grads = run_cost(script.removesuffix(".py"), argv)
        rate = H100_TOKENS_PER_S.get(args.dtype, H100_TOKENS_PER_S["tf32"]) * ref / train_flops(cfg)
        st = data.start_settings(args.size)
        if args.start == "paper" and not args.init_from and "start" not in totals:   # trained once
            tokens = args.start_steps * st["batch_size"] * cfg.seq_len
            rows.append(("start", "the cache's shared start", f"adamw.py, data.py's start at {args.size}: "
                         f"{args.start_steps} steps of {st['batch_size']} x {cfg.seq_len}, lr {st['lr']}",
                         tokens, 0, tokens / rate / 3600, args.start_steps))
            add("start", tokens, tokens / rate / 3600)
        rows.append((fig, run, f"{script} {' '.join(argv)}", train, ls, grads / rate / 3600, steps))
        add(fig, train + ls, grads / rate / 3600)
    out = ["| figure | run | command | steps | tokens: train + line search | passes of C4 | est. H100-hours |",
           "|---|---|---|---|---|---|---|"]
    for fig, run, command, train, ls, h, steps in rows:
        out.append(f"| {fig} | {run} | `{command}` | {steps} | {train / 1e9:.2f}B + {ls / 1e9:.2f}B | "
                   f"{(train + ls) / C4_TRAIN_TOKENS:.3f} | {h:,.1f} |")
    out += ["", "| figure | tokens read | est. H100-hours | on 1 H100 | on 8 H100s |", "|---|---|---|---|---|"]
    everything = tuple(map(sum, zip(*totals.values())))
    for fig, (t, h) in [*totals.items(), ("all", everything)]:
        out.append(f"| {fig} | {t / 1e9:,.2f}B | {h:,.0f} | {h / 24:,.1f} days | {h / 8:,.1f} h "
                   f"({h / 8 / 24:,.1f} days) |")
    out += ["", "An estimate, not a measurement. Measured on one H100 at 45m (docs/configs-and-data.md): an AdamW "
            f"step's {H100_TOKENS_PER_S['bfloat16']:,.0f} tokens/s in bf16 and "
            f"{H100_TOKENS_PER_S['tf32']:,.0f} in TF32 (float32 at full precision was not measured: "
            f"taken as TF32, an underestimate); an inner step of Algorithm 1 {INNER} gradients and a "
            f"forward {FORWARD} (TF32). Extrapolated: other sizes by model flops per token (bench.py's "
            "formula, the same utilisation), layerwise GN as (L+2)/2 GN inner steps (results/bench/"
            "small.md: 9.35 against gn_full's 4.46 gradients a step), prox-linear's inner step as "
            "GN's, Muon and SOAP as AdamW, a sweep's grid extensions (up to 2 runs each) left out, "
            "runs that stop at the target counted to their cap, and 8 GPUs as 8x one (data parallel, "
            "not measured). Passes: tokens read over C4 en's train split (~154B tokens); with the "
            "default DATA=bbc (1.2M tokens) the scripts warn that they read it over and over."]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", choices=sorted(model.CONFIGS), help="config (default small)")
    p.add_argument("--batch-size", type=data.pos_int, default=32, help="sequences per micro-batch (32)")
    p.add_argument("--split", type=data.pos_int, default=1, help="the steps' --split (1)")
    p.add_argument("--micro", type=data.pos_int, default=2, help="micro-batches per step phase in steps, "
                   "loop and scaling: --grad-accum, --inner-steps (2)")
    p.add_argument("--repeats", type=data.pos_int, default=3, help="timed rounds (3)")
    p.add_argument("--sections", default="blocks,steps,loop,scaling",
                   help=f"comma-separated, of {', '.join(SECTIONS)} (default blocks,steps,loop,scaling)")
    p.add_argument("--steps", default="gradient,bare," + ",".join(SCRIPTS),
                   help="the steps section's rows (and the memory section's scripts)")
    p.add_argument("--devices", default="1,2,4", help="scaling: simulated CPU device counts (1,2,4)")
    p.add_argument("--batch-45m", type=data.pos_int, default=4, help="util45m: sequences of T (4)")
    p.add_argument("--big", default="45m", choices=sorted(model.CONFIGS),
                   help="the config of the util45m, memory and rss sections (45m; tiny: a smoke test)")
    p.add_argument("--limit", type=float, default=20.0, help="memory: GiB a step's analysis may take (20: "
                   "23.5 GiB less ~1 GiB of runtime and the analysis' ~10%% underestimate, see rss)")
    p.add_argument("--alloc-rounds", type=data.nonneg_int, default=2, help="blocks and steps: subprocesses "
                   "with the allocator setting and as many without (FULLGN_MALLOPT=0), interleaved; 0: "
                   "in this process alone, under its own setting (2)")
    p.add_argument("--worker", choices=["blocks", "steps"], help=argparse.SUPPRESS)   # allocator()'s
    p.add_argument("--rss-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="also write the tables to this file")
    p.add_argument("--plan", default="", help="print the estimated cost of the runs listed in this file "
                   "(what ./run.sh full --dry-run writes) instead of measuring")
    a = p.parse_args(argv)
    if a.plan:
        return print(plan(a.plan))
    if a.rss_worker:
        return rss_worker(a.big)
    if a.worker:                                    # one subprocess of allocator() or scaling()
        info, times = block_times(a) if a.worker == "blocks" else step_times(a, a.steps.split(","))
        return print(json.dumps({"info": info, "times": times, "mallopt": data.MALLOPT}))
    if unknown := set(a.sections.split(",")) - set(SECTIONS):
        p.error(f"unknown sections {unknown}")
    load = os.getloadavg()[0]
    small = [s for s in a.sections.split(",") if s in ("blocks", "steps", "loop", "scaling")]
    out = [f"`python bench.py {' '.join(argv or [])}` on {jax.device_count()} {jax.devices()[0].platform} "
           f"device(s), {os.cpu_count()} cores, jax {jax.__version__}"
           + (f"; {', '.join(small)} on {a.size}, {a.batch_size} x {model.CONFIGS[a.size].seq_len} "
              "micro-batches" if small else "")]
    for s in a.sections.split(","):
        say(f"section {s}")
        title, section = SECTIONS[s]
        out += ["", f"### {title}", ""] + section(a)
    out += ["", f"Wall time {time.perf_counter() - T_START:.0f} s; load average (1 min) {load:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end."]
    print("\n".join(out))
    if a.out:
        open(a.out, "w").write("\n".join(out) + "\n")


if __name__ == "__main__":
    data.main_guard(lambda: main(sys.argv[1:]))
