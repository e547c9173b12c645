"""The ``streamlev`` command: demo on real keys, select from files, merge and inspect sketches.

Subcommands
-----------
``streamlev demo``
    Streams the embedded real MiniLM keys (:func:`streamlev.datasets.load_minilm`)
    through one :class:`~streamlev.LevSketch` per head, checks the result against
    brute force and reports how much *softmax* mass the set captures.
``streamlev select FILE``
    Streams keys from ``.npy`` (memory-mapped), ``.npz`` or ``.safetensors`` in
    chunks and prints the universal set (``--json`` for machine-readable output,
    ``--save`` to write the sketch bytes).
``streamlev merge A B ... -o OUT``
    Merges saved sketches (built on disjoint ids, see ``select --id-offset``).
``streamlev inspect SKETCH``
    Prints a summary of a saved sketch.

User errors (missing file, wrong array name or shape, NaN, bad parameters,
corrupt sketch files) print one line ``streamlev: error: ...`` to stderr and
exit with status 2; a failed demo verification exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np

import streamlev

from . import LpSketch, __version__
from . import reference as ref
from .datasets import load_minilm
from .sketch import LevSketch

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_HEAVY_RTOL = 1e-9  # an entry counts as heavy when A >= eps * (1 + 1e-9): ties at eps are rounding noise


class CLIError(Exception):
    """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message):
        raise CLIError(message)


# ---------------------------------------------------------------- argument types
def _eps(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eps must be a number in (0, 1], got {text!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"eps must be in (0, 1], got {text}")
    return v


def _p(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"p must be a positive number, got {text!r}") from None
    if not (0.0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"p must be a positive finite number, got {text}")
    return v


def _int_at_least(lo: int, what: str):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {lo}, got {v}")
        return v

    return conv


def _layers(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must be comma-separated integers, got {text!r}") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamlev", description="Universal sets of attention keys (LevAttention): keys that "
                     "can receive |x|^p attention share >= eps from any query, kept in one pass.")
    parser.add_argument("--version", action="version", version=f"streamlev {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("demo", help="run on real MiniLM attention keys shipped with streamlev",
                       description="Stream the embedded real MiniLM keys through one sketch per head, verify "
                       "against brute force and compare softmax mass with same-size budgets.")
    d.add_argument("--eps", type=_eps, default=0.1, help="attention share threshold in (0, 1] (default 0.1)")
    d.add_argument("--layers", type=_layers, default=None, help="comma-separated layers to run (default all)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--plot", metavar="PATH", default=None,
                   help="write the plot here (default streamlev-demo.png if matplotlib is installed)")
    g.add_argument("--no-plot", action="store_true", help="do not write a plot")
    d.add_argument("--quiet", action="store_true", help="print the summary only, not the per-head table")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("select", help="stream keys from a file and print the universal set",
                       description="Stream an (n, d) key array from .npy (memory-mapped), .npz or .safetensors "
                       "in chunks and print the ids (row numbers + --id-offset) and scores of the universal set.")
    s.add_argument("file", metavar="FILE", help="keys: .npy, .npz or .safetensors holding a 2-D (n, d) array")
    s.add_argument("--key", default=None, help="array name in a .npz / tensor name in a .safetensors "
                   "(optional if the file holds exactly one)")
    s.add_argument("--eps", type=_eps, default=0.1, help="attention share threshold in (0, 1] (default 0.1)")
    s.add_argument("--p", type=_p, default=2.0, help="attention exponent, f(x) = |x|^p (default 2)")
    s.add_argument("--chunk", type=_int_at_least(1, "chunk"), default=4096, help="rows per chunk (default 4096)")
    s.add_argument("--id-offset", type=_int_at_least(0, "id-offset"), default=0,
                   help="id of the first row (default 0); give shards disjoint ids so their sketches merge")
    s.add_argument("--json", action="store_true", help="print JSON: ids, scores, n, d, eps, p, num_retained, seconds")
    s.add_argument("--save", metavar="SKETCH", default=None, help="write the sketch bytes to this file")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")
    s.set_defaults(func=_cmd_select)

    m = sub.add_parser("merge", help="merge saved sketches", description="Merge sketches saved by "
                       "'select --save' (built on disjoint ids) into one; the result equals the sketch of "
                       "all their keys.")
    m.add_argument("sketches", metavar="SKETCH", nargs="+", help="sketch files to merge")
    m.add_argument("-o", "--output", metavar="OUT", required=True, help="file to write the merged sketch to")
    m.add_argument("--quiet", action="store_true", help="print nothing on success")
    m.set_defaults(func=_cmd_merge)

    i = sub.add_parser("inspect", help="summarise a saved sketch", description="Print kind, d, eps, p, n, "
                       "num_retained, nbytes, bound and the top scores of a saved sketch.")
    i.add_argument("sketch", metavar="SKETCH", help="sketch file")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--top", type=_int_at_least(0, "top"), default=10, help="how many top scores (default 10)")
    i.set_defaults(func=_cmd_inspect)
    return parser


# ------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    """Run the ``streamlev`` command line; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 when the demo's verification fails, 2 on a user error
        (reported as one line ``streamlev: error: ...`` on stderr).
    """
    try:
        parser = _build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        return int(args.func(args) or 0)
    except CLIError as exc:
        msg = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"streamlev: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("streamlev: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `streamlev select ... | head`
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")
        return EXIT_OK


# ------------------------------------------------------------------- helpers
def _progress(total: int, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="keys", unit_scale=True, desc=desc, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def _make_sketch(d: int, eps: float, p: float):
    if p == 2.0:
        return LevSketch(d, eps)
    try:
        return LpSketch(d, eps, p=p)
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None


def _write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # never leave a half-written sketch under the final name
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise CLIError(f"cannot write {path}: {exc.strerror or exc}") from None


def _sketch_kind(data: bytes) -> str | None:
    """Kind name from the header of the streamlev byte format (see streamlev/_format.py), or None."""
    if len(data) < 7 or data[:4] != b"SLEV":
        return None
    k = data[6]
    try:
        return data[7 : 7 + k].decode("ascii")
    except UnicodeDecodeError:
        return None


def _load_sketch(path: str):
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
    kind = _sketch_kind(data)
    if kind is None:
        raise CLIError(f"{path}: not a streamlev sketch file (no 'SLEV' header); write one with "
                       "'streamlev select FILE --save SKETCH'")
    cls = getattr(streamlev, kind, None)
    try:
        if cls is None or not hasattr(cls, "from_bytes"):
            # unknown kind: let the reader report a checksum error first (corrupt file), else the kind
            streamlev.LevSketch.from_bytes(data)
        return cls.from_bytes(data)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{path}: corrupt or invalid sketch file: {exc}") from None


def _bound(sk) -> int:
    return int(type(sk).max_retained(sk.d, sk.eps, sk.p))


# -------------------------------------------------------------------- select
class _KeySource:
    """An (n, d) key array read lazily by row ranges."""

    def __init__(self, name: str, shape: tuple, dtype: str, read, kind: str | None = None):
        # kind: numpy dtype kind when known up front (safetensors dtypes are checked per chunk)
        self.name, self.shape, self.dtype, self.read, self.kind = name, shape, dtype, read, kind


def _open_keys(path: str, key: str | None, stack: contextlib.ExitStack) -> _KeySource:
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CLIError(f"{path}: is a directory, expected a .npy, .npz or .safetensors file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        if key is not None:
            raise CLIError(f"--key applies to .npz and .safetensors files; {path} is a .npy holding one array")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CLIError(f"cannot read {path} as .npy: {exc}") from None
        return _KeySource("", arr.shape, str(arr.dtype), lambda s, t: arr[s:t], arr.dtype.kind)
    if ext == ".npz":
        try:
            z = stack.enter_context(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise CLIError(f"cannot read {path} as .npz: {exc}") from None
        name = _choose(path, key, list(z.files), "array")
        try:
            arr = z[name]  # a .npz member is read whole (zip members cannot be memory-mapped in general)
        except (ValueError, OSError, EOFError) as exc:
            raise CLIError(f"cannot read array {name!r} of {path}: {exc}") from None
        return _KeySource(name, arr.shape, str(arr.dtype), lambda s, t: arr[s:t], arr.dtype.kind)
    if ext == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise CLIError("reading .safetensors needs the 'safetensors' package: "
                           "pip install 'streamlev[safetensors]'") from None
        try:
            f = stack.enter_context(safe_open(path, framework="numpy"))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CLIError(f"cannot read {path} as .safetensors: {exc}") from None
        name = _choose(path, key, sorted(f.keys()), "tensor")
        sl = f.get_slice(name)
        shape, dtype = tuple(sl.get_shape()), str(sl.get_dtype())

        def read(s, t):
            try:
                return sl[s:t]  # only these rows are read from disk
            except Exception as exc:  # e.g. BF16, which numpy has no dtype for
                raise CLIError(f"cannot read tensor {name!r} ({dtype}) of {path} as numpy: {exc}") from None

        return _KeySource(name, shape, dtype, read)
    raise CLIError(f"{path}: unsupported file type {ext or '(no extension)'!r}; expected .npy, .npz or .safetensors")


def _choose(path: str, key: str | None, names: list, what: str) -> str:
    if key is not None:
        if key not in names:
            raise CLIError(f"{path} has no {what} named {key!r}; it holds {names}")
        return key
    if len(names) == 1:
        return names[0]
    if not names:
        raise CLIError(f"{path} holds no {what}s")
    raise CLIError(f"{path} holds {len(names)} {what}s {names}; choose one with --key NAME")


def _check_shape(src: _KeySource, path: str) -> tuple[int, int]:
    label = f"{path}" + (f" [{src.name}]" if src.name else "")
    if len(src.shape) != 2:
        hint = (" (for one key use shape (1, d))" if len(src.shape) == 1 else
                "; save one head's keys, e.g. k[layer, head], as a 2-D array" if len(src.shape) > 2 else "")
        raise CLIError(f"{label} has shape {src.shape}; expected 2-D keys of shape (n, d){hint}")
    n, d = (int(x) for x in src.shape)
    if d < 1:
        raise CLIError(f"{label} has shape {src.shape}: keys need at least one column")
    if src.kind is not None and src.kind not in "fiu":
        raise CLIError(f"{label} has dtype {src.dtype}; expected real numbers (float or integer)")
    return n, d


def _cmd_select(args) -> int:
    path = args.file
    with contextlib.ExitStack() as stack:
        src = _open_keys(path, args.key, stack)
        n, d = _check_shape(src, path)
        label = f"{path}" + (f" [{src.name}]" if src.name else "")
        sk = _make_sketch(d, args.eps, args.p)
        t0 = time.perf_counter()
        with _progress(n, args.quiet, "streamlev select") as bar:
            for s in range(0, n, args.chunk):
                t = min(n, s + args.chunk)
                block = np.asarray(src.read(s, t))
                if block.dtype.kind not in "fiu":
                    raise CLIError(f"{label} has dtype {block.dtype}; expected real numbers (float or integer)")
                if block.dtype.kind == "f" and not np.isfinite(block).all():
                    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
                    raise CLIError(f"{label}: row {s + int(bad[0])} holds NaN or Inf ({bad.size} bad row(s) among rows "
                                   f"{s}..{t - 1}); remove or fix them")
                ids = np.arange(args.id_offset + s, args.id_offset + t, dtype=np.int64)
                try:
                    sk.update(block, ids=ids)
                except (TypeError, ValueError) as exc:
                    raise CLIError(f"{label}: rows {s}..{t - 1}: {exc}") from None
                bar.update(t - s)
        ids, scores = sk.scores()
        seconds = time.perf_counter() - t0
    keep = scores >= args.eps
    ids, scores = ids[keep], scores[keep]
    if args.save:
        _write_bytes(args.save, sk.to_bytes())
    if args.json:
        out = {"file": path, "key": src.name or None, "n": n, "d": d, "eps": args.eps, "p": args.p,
               "num_retained": int(ids.size), "bound": _bound(sk), "seconds": seconds,
               "ids": ids.tolist(), "scores": scores.tolist()}
        if args.save:
            out["saved"] = args.save
        print(json.dumps(out))
        return EXIT_OK
    if not args.quiet:
        print(f"# {label}: n={n} keys, d={d}, eps={args.eps:g}, p={args.p:g}: |U| = {ids.size} "
              f"(bound floor(d/eps) = {_bound(sk)}), {seconds:.3f} s"
              + (f"; sketch saved to {args.save}" if args.save else ""))
        print("# id\tscore")
    sys.stdout.write("".join(f"{i}\t{v:.12g}\n" for i, v in zip(ids.tolist(), scores.tolist())))
    return EXIT_OK


# ------------------------------------------------------------ merge / inspect
def _cmd_merge(args) -> int:
    sketches = [_load_sketch(p) for p in args.sketches]
    acc = sketches[0]
    for path, other in zip(args.sketches[1:], sketches[1:]):
        try:
            acc.merge(other)
        except (TypeError, ValueError) as exc:
            raise CLIError(f"cannot merge {path} into {args.sketches[0]}: {exc}") from None
    _write_bytes(args.output, acc.to_bytes())
    if not args.quiet:
        print(f"merged {len(sketches)} sketches: n={acc.n}, num_retained={acc.num_retained} -> {args.output}")
    return EXIT_OK


def _cmd_inspect(args) -> int:
    sk = _load_sketch(args.sketch)
    ids, scores = sk.scores()
    order = np.argsort(-scores, kind="stable")[: args.top]
    info = {"file": args.sketch, "kind": type(sk).__name__, "d": sk.d, "eps": sk.eps, "p": sk.p,
            "rtol": getattr(sk, "rtol", None), "n": sk.n, "num_retained": sk.num_retained, "nbytes": sk.nbytes,
            "bound": _bound(sk), "file_bytes": os.path.getsize(args.sketch),
            "top": [{"id": int(ids[k]), "score": float(scores[k])} for k in order]}
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k != "top":
            print(f"{k:<{width}}  {v}")
    print(f"{'top':<{width}}  " + (", ".join(f"{t['id']}:{t['score']:.6f}" for t in info["top"]) or "(none)"))
    return EXIT_OK


# ---------------------------------------------------------------------- demo
@contextlib.contextmanager
def _small_blas():
    """One BLAS thread for the demo's tiny (256 x 32) matrices, when threadpoolctl is available.

    Threaded BLAS on such small problems mostly waits on thread hand-offs (several
    times slower on a busy 2-core machine); results are identical either way.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _softmax(Q, K):
    S = (Q @ K.T) / math.sqrt(K.shape[1])
    S -= S.max(axis=1, keepdims=True)
    P = np.exp(S)
    P /= P.sum(axis=1, keepdims=True)
    return P


def _demo_head(K, Q, eps, rng):
    """Stream one head's keys (prefill blocks, then decode one by one) and check it against brute force."""
    n, d = K.shape
    n_prefill = n - n // 4
    block = max(1, n_prefill // 3)
    t0 = time.perf_counter()
    sk = LevSketch(d, eps)
    for s in range(0, n_prefill, block):  # prefill in blocks
        sk.update(K[s : min(n_prefill, s + block)])
    entered = evicted = 0
    for j in range(n_prefill, n):  # decode: one key at a time, reporting evictions
        ch = sk.update(K[j], return_changes=True)
        entered += ch.added.size
        evicted += ch.evicted.size
    U = sk.universal_set()
    seconds = time.perf_counter() - t0

    in_u = np.zeros(n, dtype=bool)
    in_u[U] = True
    thr = eps * (1 + _HEAVY_RTOL)
    heavy_real = ref.attention_x2(Q, K) >= thr
    heavy_worst = ref.attention_x2(ref.worst_case_queries(K), K) >= thr
    missed = np.flatnonzero((heavy_real.any(axis=0) | heavy_worst.any(axis=0)) & ~in_u)
    tau = ref.leverage_scores(K)
    # exact set for p = 2, except within the documented accuracy band around eps
    mismatch = np.flatnonzero((in_u != (tau >= eps)) & (np.abs(tau - eps) > 1e-9))

    P = _softmax(Q, K)
    m = U.size
    rand = rng.choice(n, size=m, replace=False)
    norm = np.argsort(-np.linalg.norm(K, axis=1), kind="stable")[:m]
    return {
        "n": n, "d": d, "U": m, "bound": LevSketch.max_retained(d, eps), "nbytes": sk.nbytes,
        "seconds": seconds, "entered": entered, "evicted": evicted, "n_prefill": n_prefill, "block": block,
        "heavy_real": int(heavy_real.sum()), "heavy_worst": int(heavy_worst.sum()), "missed": missed,
        "mismatch": mismatch, "tau": tau,
        "mass_U": float(P[:, U].sum(axis=1).mean()), "mass_rand": float(P[:, rand].sum(axis=1).mean()),
        "mass_norm": float(P[:, norm].sum(axis=1).mean()),
    }


def _cmd_demo(args) -> int:
    plot_path = None
    if not args.no_plot:
        have_mpl = _has_matplotlib()
        if args.plot is not None and not have_mpl:
            raise CLIError("--plot needs matplotlib: pip install 'streamlev[plot]' (or use --no-plot)")
        if have_mpl:
            plot_path = args.plot or "streamlev-demo.png"
        elif not args.quiet:
            print("(matplotlib is not installed: no plot; pip install 'streamlev[plot]')")
    s = load_minilm()
    layers = list(range(s.n_layers)) if args.layers is None else args.layers
    bad = [L for L in layers if not 0 <= L < s.n_layers]
    if bad or not layers:
        raise CLIError(f"--layers must be in 0..{s.n_layers - 1}, got {args.layers}")
    eps = args.eps
    rng = np.random.default_rng(0)
    rows = []
    out = print if not args.quiet else (lambda *a, **k: None)
    out(f"Real keys: {s.model}, {s.n_tokens} tokens of {s.text_source}")
    out(f"{len(layers)} layers x {s.n_heads} heads, head_dim {s.head_dim}; eps = {eps:g}")
    with _small_blas():
        for L in layers:
            for H in range(s.n_heads):
                r = _demo_head(s.k[L, H], s.q[L, H], eps, rng)
                r["layer"], r["head"] = int(s.layers[L]), H
                rows.append(r)
    r0 = rows[0]
    out(f"Each head: {r0['n_prefill']} keys as prefill blocks of {r0['block']}, then {r0['n'] - r0['n_prefill']} "
        "keys one at a time (decode path, update(key, return_changes=True)).")
    out("")
    out(f"{'layer':>5} {'head':>4} {'n':>5} {'|U|':>5} {'d/eps':>6} {'KiB':>6} {'ms':>7} {'decode in/out':>14}")
    for r in rows:
        out(f"{r['layer']:>5} {r['head']:>4} {r['n']:>5} {r['U']:>5} {r['bound']:>6} {r['nbytes'] / 1024:>6.1f} "
            f"{1e3 * r['seconds']:>7.1f} {str(r['entered']) + '/' + str(r['evicted']):>14}")
    sizes = np.array([r["U"] for r in rows])
    n = r0["n"]
    print(f"{len(rows)} heads: |U| median {np.median(sizes):g} of n = {n} (min {sizes.min()}, max {sizes.max()}), "
          f"bound floor(d/eps) = {r0['bound']}; sketch {np.median([r['nbytes'] for r in rows]) / 1024:.1f} KiB "
          f"median; {sum(r['seconds'] for r in rows):.2f} s streaming in total")

    h_real = sum(r["heavy_real"] for r in rows)
    h_worst = sum(r["heavy_worst"] for r in rows)
    missed = sum(r["missed"].size for r in rows)
    mism = [r for r in rows if r["mismatch"].size]
    print(f"Brute force (|x|^2 attention, streamlev.reference.attention_x2): {h_real + h_worst} heavy entries "
          f"A_ij >= {eps:g} checked ({h_real} from the real queries, {h_worst} from each key's worst-case query): "
          + ("all in U" if missed == 0 else f"FAILED: {missed} keys with a heavy entry are not in U"))
    print(f"U equals the exact offline set {{j : tau_j >= {eps:g}}}: {len(rows) - len(mism)}/{len(rows)} heads"
          + ("" if not mism else " -- FAILED on " + ", ".join(f"L{r['layer']}H{r['head']}" for r in mism[:5])))

    mu, mr, mn = (np.array([r[k] for r in rows]) for k in ("mass_U", "mass_rand", "mass_norm"))
    worst = rows[int(np.argmin(mu))]
    print(f"Softmax attention (real queries, scale 1/sqrt({r0['d']})), which the guarantee does NOT cover: "
          f"mean mass captured by U {100 * mu.mean():.1f}% (worst head {100 * mu.min():.1f}%, "
          f"L{worst['layer']}H{worst['head']}) vs a same-size budget of random keys {100 * mr.mean():.1f}% and of "
          f"largest-norm keys {100 * mn.mean():.1f}%; U keeps {100 * sizes.mean() / n:.0f}% of the keys.")
    out("  (|x|^2: no query can give a key outside U a share >= eps. Softmax has no universal set: the query "
        "t * k_j makes any distinct key j heavy as t grows, so for softmax U is a ranking heuristic.)")
    if plot_path:
        try:
            _demo_plot(rows, eps, plot_path, s.model)
        except OSError as exc:
            raise CLIError(f"cannot write plot {plot_path}: {exc.strerror or exc}") from None
        print(f"plot written to {plot_path}")
    return EXIT_OK if (missed == 0 and not mism) else EXIT_FAILED


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _demo_plot(rows, eps, path, model):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    n = rows[0]["n"]
    for r in rows:
        ax1.plot(np.arange(1, n + 1), np.sort(r["tau"])[::-1], color="C0", alpha=0.25, lw=0.8)
    ax1.axhline(eps, color="C3", ls="--", lw=1, label=f"eps = {eps:g}")
    ax1.set_xlabel("keys, sorted by leverage")
    ax1.set_ylabel("leverage tau_j (max |x|^2 share)")
    ax1.set_title(f"Leverage of {len(rows)} real heads")
    ax1.legend()
    order = np.argsort([r["mass_U"] for r in rows])
    x = np.arange(len(rows))
    for key, label, c in (("mass_U", "U (leverage >= eps)", "C0"), ("mass_rand", "random, same size", "C7"),
                          ("mass_norm", "largest norm, same size", "C1")):
        ax2.plot(x, [100 * rows[i][key] for i in order], ".", color=c, label=label, ms=4)
    ax2.set_xlabel("heads, sorted by mass captured by U")
    ax2.set_ylabel("softmax mass captured (%)")
    ax2.set_title("Softmax mass (not guaranteed)")
    ax2.set_ylim(0, 100)
    ax2.legend(loc="lower right")
    fig.suptitle(f"streamlev demo: {model}", fontsize=10)
    fig.savefig(path)
