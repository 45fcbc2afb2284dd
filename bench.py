"""Speed and memory of every method, measured in one run; prints (and --out writes) markdown tables.

    python bench.py --size small                          # blocks, steps, loop, scaling: < 10 min
    python bench.py --sections util45m,memory,rss         # the 45m sections: about 10 min
    python bench.py --plan FILE                           # the estimated cost of run.sh full's runs

Absolute times on a shared machine are noisy; the ratios are what matter. Each table times its
entries in interleaved rounds (one call of each per round, after a warm-up call; the median over
--repeats rounds), so that a change of load hits every entry alike. Ratios of process CPU time are
given beside them: CPU time barely moves when another job takes our cores (wall time doubles).

blocks   GN building blocks on one micro-batch, in gradients (jit(value_and_grad(l o f))): a G v
         product with the linearisation reused as CG reuses it, (linearise + 3 products - linearise
         + 1) / 2; one gn_cg.cg iteration likewise; the inner step gn_full.quad_model_grad.
steps    each script's jitted step as its main() builds it (parse, state, make_step) with --micro
         micro-batches per phase, chained on device-resident batches at steps t = 0, 1, 2, ... (SOAP
         and K-FAC refresh their eigendecompositions at t = 0, 10, ...: the median is a step
         without; *_refresh rows refresh at every step): compile time, time per call,
         tokens/s of all it consumes (line search included), and time per token over a bare loop's
         (jit(value_and_grad) per micro-batch, one jitted optax.adamw update): adamw does the same
         work, so its excess is overhead.
loop     adamw.main for 6 steps: its step_time and whole loop iteration against the tight loop.
scaling  adamw and gn_full steps on 1, 2 and 4 simulated CPU devices (subprocesses), placed as Run.
util45m  45m forward+backward on --batch-45m x 1024, and its parts, against the matmul peak.
         (util45m, memory and rss run at --big, 45m by default; --big tiny is their smoke test)
memory   45m steps at --batch-size x 1024 (the paper's 32; Figure 1's 128 at --big 150m), one
         micro-batch per phase (CG with the paper's 50 iterations), never run: XLA's memory
         analysis of the compiled step; the smallest --split under --limit, and the largest
         micro-batch at --split 1.
rss      one real execution of the 45m gn_full step of `memory` (a subprocess): its peak RSS.

Model flops per token: fp32 matmuls, 2 per multiply-add (not norms, softmax, gelu). With N = L
(4 d^2 + 2 d d_ff) + d V matmul parameters (wte is a gather), training costs 6 N + 6 L T d, the
last term QK^T and AV forward and backward over the causal half of the scores. XLA computes the
whole masked square, 6 N + 12 L T d: we count the useful flops, as MFU does.

Page faults: glibc's malloc maps every buffer over 32 MB afresh on each call, and the kernel
zeroes its pages, so kernel time is a large share of CPU time here. Measured on small: with
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian libtcmalloc-minimal4) the
gradient is 30% faster and the inner step 23% (45m fwd+bwd: 20%); neither jemalloc nor glibc's
tunables (mmap_threshold; hugetlb helps the gradient only) do as well.
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


def rounds(fns, repeats):
    """Median wall, process-CPU and kernel (sys) seconds of each zero-argument call, over
    interleaved rounds."""
    for f in fns.values():
        jax.block_until_ready(f())                        # compile and warm up
    wall, cpu, kernel = ({k: [] for k in fns} for _ in range(3))
    for r in range(repeats):
        say(f"  round {r + 1}/{repeats}")
        for k, f in fns.items():
            t0, c0, k0 = time.perf_counter(), time.process_time(), os.times().system   # k0: 10 ms ticks
            jax.block_until_ready(f())
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            kernel[k].append(os.times().system - k0)
    return ({k: statistics.median(v) for k, v in ts.items()} for ts in (wall, cpu, kernel))


def train_flops(cfg):
    """Model flops of one training token (see the docstring)."""
    n = cfg.n_layers * (4 * cfg.d ** 2 + 2 * cfg.d * cfg.d_ff) + cfg.d * cfg.vocab
    return 6 * n + 6 * cfg.n_layers * cfg.seq_len * cfg.d


def matmul_peak(n=4096):
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

def blocks(a):
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

    peak, peak_flops = matmul_peak()
    say(f"blocks: compiling, then {a.repeats} rounds")
    wall, cpu, kernel = rounds({"peak": peak, "grad": lambda: grad(params, b, cfg),
                        "p1": lambda: products(params, b, v, 1), "p3": lambda: products(params, b, v, 3),
                        "cg1": lambda: cg(params, b, v, jnp.inf), "cg3": lambda: cg(params, b, v, 0.0),
                        "inner": lambda: inner(params, v, b), "fwd": lambda: fwd(params, b)}, a.repeats)
    for t in wall, cpu:
        t["product"], t["cg"] = (t["p3"] - t["p1"]) / 2, (t["cg3"] - t["cg1"]) / 2
    lines = ["| quantity | time (ms) | in gradients | in gradients, CPU time |", "|---|---|---|---|"]
    for name, k in [("gradient (value_and_grad)", "grad"),
                    ("GGN-vector product, linearisation reused (as CG reuses it)", "product"),
                    ("one CG iteration (G v + lam v and the vector ops)", "cg"),
                    ("linearise + 1 GGN-vector product", "p1"),
                    ("inner step of Algorithm 1: J^T (g0 + H0 J D) on a fresh micro-batch", "inner"),
                    ("line-search forward (loss only)", "fwd")]:
        lines.append(f"| {name} | {1e3 * wall[k]:.1f} | {wall[k] / wall['grad']:.2f} | "
                     f"{cpu[k] / cpu['grad']:.2f} |")
    rate = train_flops(cfg) * a.batch_size * cfg.seq_len / wall["grad"]
    peak_rate = peak_flops / wall["peak"]
    return lines + ["", f"Matmul peak (4096^2 fp32 jnp.dot, in the same rounds) {peak_rate / 1e9:.0f} "
                    f"GFLOP/s; the gradient's model flops ({train_flops(cfg) / 1e6:.2f} M per token) run "
                    f"at {rate / 1e9:.1f} GFLOP/s = **{100 * rate / peak_rate:.0f}%** of it. The kernel takes "
                    f"{100 * kernel['grad'] / cpu['grad']:.0f}% of the gradient's CPU time: page faults (see "
                    "the docstring)."]


def steps(a, names):
    """Time per call of each named step (SCRIPTS, "gradient", "bare") on this process's devices."""
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
    fns = {k: fns[k] for k in names}
    say(f"steps: timing {', '.join(names)}")
    wall, cpu, _ = rounds(fns, a.repeats)
    tokens = a.batch_size * cfg.seq_len
    return {k: info[k] | {"time": wall[k], "cpu": cpu[k], "tokens": info[k]["micro"] * tokens} for k in names}


def steps_table(info):
    grad, bare = info.get("gradient"), info.get("bare")
    lines = ["| step | micro-batches per call | compile (s) | time per call (s) | in gradients | "
             "tokens/s | time per token vs bare loop | same, CPU time |", "|---|---|---|---|---|---|---|---|"]
    for name, r in info.items():
        cells = [name, r["micro"], f"{r['compile']:.1f}" if "compile" in r else "-", f"{r['time']:.3f}",
                 f"{r['time'] / grad['time']:.2f}" if grad else "-", f"{r['tokens'] / r['time']:,.0f}"]
        cells += [f"{r[k] / r['tokens'] / (bare[k] / bare['tokens']):.3f}" if bare else "-"
                  for k in ("time", "cpu")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def loop(a):
    flags = f"--size {a.size} --batch-size {a.batch_size} --split {a.split} --grad-accum {a.micro}"
    call = compiled_step("adamw", flags, a.batch_size, data.make_mesh())[0]
    say("loop: tight loop of the adamw step")
    before = next(rounds({"t": call}, a.repeats))["t"]
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
    t = (before + next(rounds({"t": call}, a.repeats))["t"]) / 2
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
        out = subprocess.run([sys.executable, __file__, "--size", a.size, "--batch-size", str(a.batch_size),
                              "--split", str(a.split), "--micro", str(a.micro), "--repeats", str(a.repeats),
                              "--steps", "adamw,gn_full", "--json"], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, XLA_FLAGS=flags.strip()), check=True).stdout
        r = json.loads(out.splitlines()[-1])
        lines.append(f"| {n} | {r['adamw']['tokens'] / r['adamw']['time']:,.0f} | "
                     f"{r['gn_full']['tokens'] / r['gn_full']['time']:,.0f} |")
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
    t = next(rounds({"peak": peak, "grad": lambda: grad(params, b, cfg),
                   "blocks": lambda: blocks(params, b["inputs"]), "attn": lambda: attn(params["h"][0], h)},
                    a.repeats))
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
    say(f"rss: a subprocess runs the {a.big} gn_full step at 32 x T, --split 4 (minutes at 45m)")
    out = subprocess.run([sys.executable, __file__, "--rss-worker", "--big", a.big], stdout=subprocess.PIPE,
                         text=True, check=True).stdout
    r = json.loads(out.splitlines()[-1])
    own = r["peak"] - r["before"] + r["args"]       # the step's own peak, its arguments included
    return [f"{a.big} gn_full step at 32 x T, --split 4, 1 inner step, 1 line-search batch: XLA's analysis "
            f"{r['analysis']:.2f} GiB; the process's RSS {r['before']:.2f} GiB before the step (runtime, "
            f"params, state, batches), peak {r['peak']:.2f} GiB; the step's own peak (peak - before + "
            f"arguments) {own:.2f} GiB = **{100 * (own / r['analysis'] - 1):+.0f}%** over the analysis."]


def rss_worker(size):
    cfg, step, init, micro = build("gn_full", memory_flags("gn_full", 32, 4, size))
    state = init(model.init_params(cfg, jax.random.key(0)))
    batches = jax.tree.map(jnp.asarray, token_batches(cfg, 32, micro))
    compiled = step.lower(state, batches, 0).compile()
    m = compiled.memory_analysis()
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    jax.block_until_ready(compiled(state, batches, 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024          # ru_maxrss is in KiB
    print(json.dumps({"analysis": peak_bytes(compiled) / 2 ** 30, "args": m.argument_size_in_bytes / 2 ** 30,
                      "before": before / 2 ** 30, "peak": peak / 2 ** 30}))


# ============================================================================ main

SECTIONS = {"blocks": ("GN building blocks, in gradients", blocks),
            "steps": ("Each script's step", lambda a: steps_table(steps(a, a.steps.split(",")))),
            "loop": ("Script-loop overhead", loop),
            "scaling": ("Device scaling (simulated CPU devices)", scaling),
            "util45m": ("Hardware utilisation at --big (45m)", util45m),
            "memory": ("Memory at --big without running (XLA's compiled memory analysis)", memory),
            "rss": ("Memory analysis at --big (45m) against a real run", rss)}


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
            "small.md: 8.59 against gn_full's 3.49 gradients a step), prox-linear's inner step as "
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
    p.add_argument("--json", action="store_true", help="print only the steps section's numbers, as JSON")
    p.add_argument("--rss-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help="also write the tables to this file")
    p.add_argument("--plan", default="", help="print the estimated cost of the runs listed in this file "
                   "(what ./run.sh full --dry-run writes) instead of measuring")
    a = p.parse_args(argv)
    if a.plan:
        return print(plan(a.plan))
    if a.rss_worker:
        return rss_worker(a.big)
    if a.json:                                      # the scaling section's subprocesses
        return print(json.dumps(steps(a, a.steps.split(","))))
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
