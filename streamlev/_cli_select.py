"""``streamlev select``: stream keys from a file through one sketch per group and print the universal set."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from tqdm import tqdm

from ._cli_common import (EXIT_OK, INT64_MAX, CLIError, bound_exponent, bound_text, budget_note, make_sketch,
                          max_retained, pick, write_bytes)
from ._constants import EPS_MIN
from ._validation import physical_memory
from .io import open_keys


def _default_max_memory() -> int | None:
    """Half the machine's physical memory (None where the platform does not say)."""
    mem = physical_memory()
    return None if mem is None else mem // 2


def _progress(total: int, quiet: bool, desc: str):
    return tqdm(total=total, unit="keys", unit_scale=True, desc=desc, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def _open(path: str, key: str | None):
    try:
        return open_keys(path, key)
    except FileNotFoundError:
        raise CLIError(f"{path}: no such file") from None
    except ValueError as exc:  # name the command-line option, not the Python keyword
        raise CLIError(str(exc).replace("key=NAME", "--key NAME").replace("key applies", "--key applies")) from None
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None


def _groups(src, index, label):
    """The group indices to sketch: every group of the leading axes, or the one --index names."""
    shape = src.shape
    if len(shape) < 2:
        raise CLIError(f"{label} has shape {shape}; expected keys of shape (n, d) (for one key use shape (1, d))")
    lead = shape[:-2]
    if index is None:
        return list(np.ndindex(*lead)) if lead else [()]
    if len(index) != len(lead) or not all(-s <= i < s for i, s in zip(index, lead)):
        raise CLIError(f"--index {','.join(map(str, index))} does not fit {label} of shape {shape}: give "
                       f"{len(lead)} index(es) within {lead} (the axes before (n, d))" if lead else
                       f"--index applies to arrays with group axes (..., n, d); {label} has shape {shape}")
    return [tuple(i % s for i, s in zip(index, lead))]


def _estimate_bytes(n: int, d: int, bound: int, chunk: int) -> int:
    """Peak memory of one sketch run: the d x d factor and its update workspace, retained keys, chunk buffers."""
    retained = min(n, bound)
    return 8 * (3 * d * d + 2 * retained * (d + 3) + 4 * min(n, chunk) * d)


def _check_problem(args, src, label, n, d, eps):
    if d < 1:
        raise CLIError(f"{label} has shape {src.shape}: keys need at least one column")
    if src.dtype != "bfloat16" and np.dtype(src.dtype).kind not in "fiu":
        raise CLIError(f"{label} has dtype {src.dtype}; expected real numbers (float or integer)")
    if 0 < n < d:
        raise CLIError(f"{label} has shape {src.shape}: n = {n} keys of dimension d = {d}. With fewer keys than "
                       "dimensions every key has leverage 1 and belongs to U, so there is nothing to select. Did "
                       f"you mean the transpose (keys as rows, shape {tuple(src.shape[:-2]) + (d, n)})? Save "
                       "np.swapaxes(a, -1, -2) (a.T for 2-D).")
    if n and args.id_offset + n - 1 > INT64_MAX:
        raise CLIError(f"--id-offset {args.id_offset} + {n} rows exceeds the largest id (int64 max {INT64_MAX}); "
                       f"use --id-offset <= {INT64_MAX - n + 1}")
    need = _estimate_bytes(n, d, max_retained(d, eps, args.p), args.chunk)
    limit = args.max_memory if args.max_memory is not None else _default_max_memory()
    if limit is not None and need > limit:
        raise CLIError(f"{label} has shape {src.shape}: one sketch with d = {d} needs about {need / 2**30:.3g} GiB "
                       f"(a {d} x {d} factor plus up to min(n, {bound_text(args.p)}) retained keys), more than "
                       f"the {limit / 2**30:.3g} GiB allowed (--max-memory). Check that the last axis is the key "
                       "dimension, raise --eps, or raise --max-memory.")


def _read_block(src, label, group, s, t):
    try:
        block = np.asarray(src.rows(s, t, group))
    except (ValueError, OSError) as exc:
        raise CLIError(f"cannot read rows {s}..{t - 1} of {label}: {exc}") from None
    if block.dtype.kind not in "fiu":
        raise CLIError(f"{label} has dtype {block.dtype}; expected real numbers (float or integer)")
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        raise CLIError(f"{label}: row {s + int(bad[0])} holds NaN or Inf ({bad.size} bad row(s) among rows "
                       f"{s}..{t - 1}); remove or fix them")
    return block


def _sketch_group(args, src, label, group, n, d, eps):
    sk = make_sketch(d, eps, args.p)
    t0 = time.perf_counter()
    with _progress(n, args.quiet, "streamlev select") as bar:
        for s in range(0, n, args.chunk):
            t = min(n, s + args.chunk)
            block = _read_block(src, label, group, s, t)
            ids = np.arange(s, t, dtype=np.int64) + np.int64(args.id_offset)  # no overflow: checked above
            try:
                sk.update(block, ids=ids)
            except (TypeError, ValueError) as exc:
                raise CLIError(f"{label}: rows {s}..{t - 1}: {exc}") from None
            bar.update(t - s)
    return sk, time.perf_counter() - t0


def cmd_select(args) -> int:
    path = args.file
    src = _open(path, args.key)
    label = f"{path}" + (f" [{src.name}]" if src.name else "")
    groups = _groups(src, args.index, label)
    n, d = (int(x) for x in src.shape[-2:])
    auto = args.budget is not None and args.eps is None  # lower eps pass by pass until the budget is filled
    eps = args.eps if args.eps is not None else 0.1 if not auto else \
        max(EPS_MIN, min(1.0, d ** bound_exponent(args.p) / args.budget))
    _check_problem(args, src, label, n, d, eps)
    several = len(groups) > 1 or bool(src.shape[:-2]) and args.index is None
    if args.save and several:
        raise CLIError(f"--save writes one sketch: {label} has {len(groups)} groups {src.shape[:-2]}; choose one "
                       "with --index")
    results = []
    for group in groups:
        e, passes = eps, 1
        sk, seconds = _sketch_group(args, src, label, group, n, d, e)
        while auto and sk.num_retained < min(n, args.budget) and e > EPS_MIN:
            # every key with score >= e is kept, so a pass that keeps >= budget keys yields the exact top scores
            e = max(EPS_MIN, e / 8)
            _check_problem(args, src, label, n, d, e)
            sk, more = _sketch_group(args, src, label, group, n, d, e)
            seconds += more
            passes += 1
        ids, scores = pick(*sk.scores(), e, args.budget)
        results.append({"index": list(group), "eps": e, "passes": passes, "num_retained": int(ids.size),
                        "seconds": seconds, "ids": ids.tolist(), "scores": scores.tolist(),
                        "note": budget_note(args.budget, ids, scores, e, passes)})
    if args.save:
        write_bytes(args.save, sk.to_bytes())
    if not several:
        eps = results[0]["eps"]
    bound = max_retained(d, eps, args.p)
    head = {"file": path, "key": src.name or None, "shape": list(src.shape), "n": n, "d": d, "eps": eps,
            "p": args.p, "budget": args.budget, "bound": bound}
    if args.json:
        if several:
            head["groups"] = [{k: v for k, v in r.items() if k != "note"} for r in results]
        else:
            head.update({k: v for k, v in results[0].items() if k not in ("note", "index", "eps")})
        if args.save:
            head["saved"] = args.save
        print(json.dumps(head))
        return EXIT_OK
    _print_select(args, label, head, results, several, auto)
    return EXIT_OK


def _print_select(args, label, head, results, several, auto):
    n, d, eps, p = head["n"], head["d"], head["eps"], head["p"]
    quiet = args.quiet
    what = ("scores are exact leverage" if p == 2.0 else
            "scores are certified upper bounds of the sensitivity, capped at 1")
    if not quiet:
        print(f"# {label}: shape {tuple(head['shape'])}, n={n} keys of d={d}, "
              + (f"eps from {eps:g} down, per group" if auto and several else f"eps={eps:g}") + f", p={p:g}"
              + (f", budget {args.budget}" if args.budget else "")
              + f"; bound {bound_text(p)} = {head['bound']} keys per sketch; {what}"
              + (f"; sketch saved to {args.save}" if args.save else ""))
    if several:
        if not quiet:
            for r in results:
                print(f"# group {tuple(r['index'])}: |U| = {r['num_retained']}{r['note']}, {r['seconds']:.3f} s")
            print("# group\tid\tscore")
        sys.stdout.write("".join(f"{','.join(map(str, r['index']))}\t{i}\t{v:.12g}\n"
                                 for r in results for i, v in zip(r["ids"], r["scores"])))
        return
    r = results[0]
    if not quiet:
        print(f"# |U| = {r['num_retained']}{r['note']}, {r['seconds']:.3f} s")
        print("# id\tscore")
    sys.stdout.write("".join(f"{i}\t{v:.12g}\n" for i, v in zip(r["ids"], r["scores"])))
