"""The ``streamlev`` command: demo on real keys, select from files, merge and inspect sketches.

Subcommands
-----------
``streamlev demo``
    Streams the real MiniLM keys shipped with the package through one
    :class:`~streamlev.LevSketch` and shows memory staying flat while the
    stream grows, checked against brute force (see :mod:`streamlev._cli_demo`).
``streamlev select FILE``
    Streams keys from ``.npy`` / ``.safetensors`` (memory-mapped; bfloat16
    included) or ``.npz`` in chunks and prints the universal set (``--json``
    for machine-readable output, ``--budget B`` for the top B, ``--save`` to
    write the sketch bytes). Arrays ``(..., n, d)`` with leading group axes
    (e.g. ``(layers, heads, n, d)``) are sketched per group, or one group with
    ``--index``.
``streamlev merge A B ... -o OUT``
    Merges saved sketches (built on disjoint ids, see ``select --id-offset``).
``streamlev inspect SKETCH``
    Prints a summary of a saved sketch; ``--all``, ``--eps`` and ``--budget``
    list its ids, re-thresholded or cut to a budget.

User errors (missing file, wrong array name or shape, NaN, bad parameters, a
problem too big for memory, corrupt sketch files) print one line
``streamlev: error: ...`` to stderr and exit with status 2; a failed demo
verification exits with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys

import numpy as np

from . import LevSketch, LpSketch, MultiHeadSketch, __version__
from . import _cli_demo
from ._cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, INT64_MAX, CLIError, pick, write_bytes
from ._cli_select import cmd_select
from ._constants import EPS_MIN

__all__ = ["main"]

_KINDS = {cls.__name__: cls for cls in (LevSketch, LpSketch, MultiHeadSketch)}
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit status 2."""

    def error(self, message):
        raise CLIError(message)


# ---------------------------------------------------------------- argument types
def _eps(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eps must be a number in [{EPS_MIN:.3g}, 1], got {text!r}") from None
    if not (EPS_MIN <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"eps must be in [{EPS_MIN:.3g}, 1] (float64 leverage cannot resolve "
                                         f"smaller shares), got {text}")
    return v


def _p(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"p must be a positive number, got {text!r}") from None
    if not (0.0 < v < math.inf):
        raise argparse.ArgumentTypeError(f"p must be a positive finite number, got {text}")
    return v


def _int_in(lo: int, what: str, hi: int = INT64_MAX):
    def conv(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer >= {lo}, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be an integer in [{lo}, {hi}], got {v}")
        return v

    return conv


def _int_list(what: str):
    def conv(text: str) -> list[int]:
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None

    return conv


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"max-memory must be a size such as 512M or 4G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _command(sub, func, name: str, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``kwargs``: help, description), whose parsed arguments run ``func``."""
    p = sub.add_parser(name, **kwargs)
    p.set_defaults(func=func)
    return p


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamlev", description="Universal sets of attention keys (LevAttention): keys that "
                     "can receive |x|^p attention share >= eps from any query, kept in one pass.")
    parser.add_argument("--version", action="version", version=f"streamlev {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    eps_help = f"attention share threshold in [{EPS_MIN:.3g}, 1]"

    d = _command(sub, _cmd_demo, "demo", help="stream real MiniLM attention keys shipped with streamlev",
                 description="Stream the real MiniLM keys shipped with streamlev through one sketch: memory "
                 "stays flat while the stream grows; the result is checked against brute force.")
    d.add_argument("--eps", type=_eps, default=_cli_demo.DEFAULT_EPS,
                   help=f"{eps_help} (default {_cli_demo.DEFAULT_EPS})")
    d.add_argument("--layers", type=_int_list("layers"), default=None,
                   help="comma-separated layers whose keys form the stream (default all 6)")
    g = d.add_mutually_exclusive_group()
    g.add_argument("--plot", metavar="PATH", default=None,
                   help="also write a plot (.png, .pdf or .svg; needs matplotlib: pip install 'streamlev[plot]')")
    g.add_argument("--no-plot", action="store_true", help="write no plot (the default)")
    d.add_argument("--quiet", action="store_true", help="print the result lines only")

    s = _command(sub, cmd_select, "select", help="stream keys from a file and print the universal set",
                 description="Stream keys (n, d) -- or (..., n, d) with group axes such as (layers, heads) -- "
                 "from .npy / .safetensors (memory-mapped; bfloat16 included) or .npz in chunks and print "
                 "the ids (row numbers + --id-offset) and scores of the universal set.")
    s.add_argument("file", metavar="FILE", help="keys: .npy, .npz or .safetensors holding an (n, d) or (..., n, d) "
                   "array")
    s.add_argument("--key", default=None, help="array name in a .npz / tensor name in a .safetensors "
                   "(optional if the file holds exactly one)")
    s.add_argument("--index", type=_int_list("index"), default=None, metavar="I,J",
                   help="one group of an (..., n, d) array, e.g. --index 3,5 for layer 3, head 5 of "
                   "(layers, heads, n, d) (default: every group, reported per group)")
    s.add_argument("--eps", type=_eps, default=None, help=f"{eps_help} (default 0.1; with --budget B and no "
                   "--eps: starts at d/B and is lowered, pass by pass, until B keys are kept)")
    s.add_argument("--budget", type=_int_in(1, "budget"), default=None, metavar="B",
                   help="print the B keys of largest score (exact for p = 2: the set of keys with score >= the "
                   "B-th largest)")
    s.add_argument("--p", type=_p, default=2.0, help="attention exponent, f(x) = |x|^p (default 2)")
    s.add_argument("--chunk", type=_int_in(1, "chunk"), default=4096, help="rows per chunk (default 4096)")
    s.add_argument("--id-offset", type=_int_in(0, "id-offset"), default=0,
                   help="id of the first row (default 0); give shards disjoint ids so their sketches merge")
    s.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                   help="refuse to start when the sketch would need more (default: half the physical memory)")
    s.add_argument("--json", action="store_true", help="print JSON: ids, scores, n, d, eps, p, num_retained, bound, "
                   "seconds (per group under 'groups' for grouped arrays)")
    s.add_argument("--save", metavar="SKETCH", default=None, help="write the sketch bytes to this file "
                   "(one group only)")
    s.add_argument("--quiet", action="store_true", help="no progress bar and no summary line")

    m = _command(sub, _cmd_merge, "merge", help="merge saved sketches", description="Merge sketches saved by "
                 "'select --save' (built on disjoint ids) into one; the result equals the sketch of "
                 "all their keys.")
    m.add_argument("sketches", metavar="SKETCH", nargs="+", help="sketch files to merge")
    m.add_argument("-o", "--output", metavar="OUT", required=True, help="file to write the merged sketch to")
    m.add_argument("--quiet", action="store_true", help="print nothing on success")

    i = _command(sub, _cmd_inspect, "inspect", help="summarise a saved sketch, list or re-threshold its ids",
                 description="Print kind, d, eps, p, n, num_retained, nbytes, file_bytes, bound and the top "
                 "scores of a saved sketch; --all lists every retained id, --eps E the ids with score >= E "
                 "(E >= the sketch's eps), --budget B the B of largest score.")
    i.add_argument("sketch", metavar="SKETCH", help="sketch file")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--top", type=_int_in(0, "top"), default=10, help="how many top scores (default 10)")
    i.add_argument("--all", action="store_true", help="list every id (with --eps/--budget: every selected id)")
    i.add_argument("--eps", type=_eps, default=None, help="re-threshold: select ids with score >= this (>= the "
                   "sketch's eps)")
    i.add_argument("--budget", type=_int_in(1, "budget"), default=None, metavar="B",
                   help="select the B ids of largest score")
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
    try:
        # unknown kind: let the reader report a checksum error first (corrupt file), else the kind
        return _KINDS.get(kind, LevSketch).from_bytes(data)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{path}: corrupt or invalid sketch file: {exc}") from None


# ------------------------------------------------------------ merge / inspect
_ID_CLASH = re.compile(r"overlap|retained by both|already used")


def _cmd_merge(args) -> int:
    sketches = [_load_sketch(p) for p in args.sketches]
    acc = sketches[0]
    for path, other in zip(args.sketches[1:], sketches[1:]):
        try:
            acc.merge(other)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            if _ID_CLASH.search(msg):
                first = msg.split(". ")[0].split(": ", 1)[-1]
                raise CLIError(f"cannot merge {path} into {args.sketches[0]}: {first}. Sketches of different shards "
                               "need disjoint ids: select each shard with --id-offset set to the row number of its "
                               "first key in the whole data set (e.g. the second shard with --id-offset <rows of "
                               "the first>)") from None
            raise CLIError(f"cannot merge {path} into {args.sketches[0]}: {msg}") from None
    write_bytes(args.output, acc.to_bytes())
    if not args.quiet:
        print(f"merged {len(sketches)} sketches: n={acc.n}, num_retained={acc.num_retained} -> {args.output}")
    return EXIT_OK


def _cmd_inspect(args) -> int:
    sk = _load_sketch(args.sketch)
    if isinstance(sk, MultiHeadSketch):
        return _inspect_multihead(args, sk)
    ids, scores = sk.scores()
    eps = sk.eps if args.eps is None else args.eps
    if eps < sk.eps:
        raise CLIError(f"--eps {eps:g} is below the sketch's eps {sk.eps:g}: keys with smaller scores were not kept; "
                       "rebuild the sketch with a smaller --eps")
    sel_ids, sel_scores = pick(ids, scores, eps, args.budget)
    order = np.argsort(-sel_scores, kind="stable")[: args.top]
    exact = isinstance(sk, LevSketch)
    info = {"file": args.sketch, "kind": type(sk).__name__, "d": sk.d, "eps": sk.eps, "p": sk.p,
            "rtol": getattr(sk, "rtol", None), "n": sk.n, "num_retained": sk.num_retained,
            "bound": int(sk.max_retained()), "nbytes": sk.nbytes,
            "file_bytes": os.path.getsize(args.sketch),
            "scores": "exact leverage" if exact else "certified upper bounds of the sensitivity, capped at 1",
            "selected_eps": eps, "budget": args.budget, "num_selected": int(sel_ids.size),
            "top": [{"id": int(sel_ids[k]), "score": float(sel_scores[k])} for k in order]}
    if args.all:
        info["ids"], info["selected_scores"] = sel_ids.tolist(), sel_scores.tolist()
    if args.json:
        print(json.dumps(info))
        return EXIT_OK
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k not in ("top", "ids", "selected_scores"):
            print(f"{k:<{width}}  {v}")
    print(f"{'top':<{width}}  " + (", ".join(f"{t['id']}:{t['score']:.6g}" for t in info["top"]) or "(none)"))
    print("# nbytes: memory of the sketch's arrays in a process (the d x d factor and the retained keys, with spare "
          "capacity); file_bytes: the serialized sketch (factor, retained rows only, header and checksum)")
    if not exact:
        print("# scores of an LpSketch are upper bounds of each key's largest |x|^p share, capped at 1: a 1 means "
              "'cannot be ruled out', not 'gets all the attention'")
    if args.all:
        print("# id\tscore")
        sys.stdout.write("".join(f"{i}\t{v:.12g}\n" for i, v in zip(info["ids"], info["selected_scores"])))
    return EXIT_OK


def _inspect_multihead(args, sk) -> int:
    info = {"file": args.sketch, "kind": "MultiHeadSketch", "heads": sk.heads, "d": sk.d, "eps": sk.eps.tolist(),
            "n": sk.n.tolist(), "num_retained": sk.num_retained.tolist(), "bound": sk.max_retained().tolist(),
            "nbytes": sk.nbytes, "file_bytes": os.path.getsize(args.sketch)}
    if args.json:
        print(json.dumps(info))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return EXIT_OK


# ---------------------------------------------------------------------- demo
_PLOT_EXTS = (".png", ".pdf", ".svg")


def _cmd_demo(args) -> int:
    if args.plot is not None:
        ext = os.path.splitext(args.plot)[1].lower()
        if ext not in _PLOT_EXTS:
            raise CLIError(f"--plot {args.plot}: the file name must end in {', '.join(_PLOT_EXTS)}, got "
                           f"{ext or 'no extension'!r}")
        if not _cli_demo.have_matplotlib():
            raise CLIError("--plot needs matplotlib: pip install 'streamlev[plot]' (or leave out --plot)")
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise CLIError(f"cannot write plot {args.plot}: no such directory {folder}")
    try:
        ok = _cli_demo.run(args.eps, args.layers, args.plot, args.quiet)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise CLIError(f"cannot write plot {args.plot}: {exc.strerror or exc}") from None
    return EXIT_OK if ok else EXIT_FAILED
