"""Coverage-guided fuzzing of LevSketch.from_bytes (atheris), with a pure-hypothesis fallback.

Contract under test: every input either decodes to a sketch whose re-encoding
is a fixed point (with finite scores within the size bound) or raises
ValueError; TypeError never happens for bytes. Anything else (another
exception, a crash, a hang) is a finding.

Usage::

    pip install atheris
    python benchmarks/fuzz_from_bytes.py -max_total_time=180          # atheris (libFuzzer flags)
    python benchmarks/fuzz_from_bytes.py --hypothesis --seconds 180  # fallback, no atheris needed

The atheris run starts from a seed corpus of valid sketches (written to
``/tmp/streamlev_fuzz_corpus``); half of the inputs get a valid CRC appended
(first input byte decides) so the fuzzer reaches the structural checks
behind the checksum.
"""

from __future__ import annotations

import os
import struct
import sys
import time
import warnings
import zlib

import numpy as np

CORPUS = "/tmp/streamlev_fuzz_corpus"


def _seeds():
    import streamlev as sl
    from streamlev.testing import make_keys

    out = [sl.LevSketch(2, 0.5).to_bytes()]
    for d, eps, kind, n in [(1, 1.0, "gaussian", 3), (3, 0.2, "heavy_tailed", 40), (4, 0.5, "low_rank", 20),
                            (2, 0.1, "huge", 30)]:
        out.append(sl.LevSketch(d, eps).update(make_keys(kind, n, d, 0)).to_bytes())
    out.append(sl.LevSketch(2, 0.3).update(make_keys("gaussian", 10, 2, 1), values=np.ones((10, 2))).to_bytes())
    return out


def _fix_crc(b: bytes) -> bytes:
    body = b[:-4] if len(b) >= 4 else b
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def one_input(data: bytes, LevSketch) -> str:
    """Decode one input under the contract; return 'ok' / 'rejected', raise on a violation."""
    if not data:
        mode = 0
    else:  # the first byte is a control byte: odd = re-checksum the rest (reach past the CRC check)
        mode, data = data[0], data[1:]
    if mode & 1:
        data = _fix_crc(data)
    try:
        sk = LevSketch.from_bytes(data)
    except ValueError:
        return "rejected"
    b = sk.to_bytes()
    if LevSketch.from_bytes(b).to_bytes() != b:
        raise AssertionError("re-encoding is not a fixed point")
    ids, tau = sk.scores()
    if not (np.isfinite(tau).all() and sk.num_retained <= LevSketch.max_retained(sk.d, sk.eps)):
        raise AssertionError(f"decoded sketch is inconsistent: tau={tau}, r={sk.num_retained}")
    return "ok"


def run_atheris(argv):
    import atheris

    import numba  # noqa: F401  (dependencies imported first: only streamlev is instrumented)
    import scipy.linalg  # noqa: F401

    with atheris.instrument_imports(include=["streamlev"]):
        import streamlev._format  # noqa: F401
        import streamlev.sketch
    LevSketch = streamlev.sketch.LevSketch
    os.makedirs(CORPUS, exist_ok=True)
    for i, s in enumerate(_seeds()):
        with open(os.path.join(CORPUS, f"seed{i}"), "wb") as f:
            f.write(b"\x00" + s)
    counts = {"ok": 0, "rejected": 0}
    t0 = time.time()

    def test_one(data):
        counts[one_input(data, LevSketch)] += 1

    def report():
        n = sum(counts.values())
        print(f"[fuzz_from_bytes] atheris: {n} executions in {time.time() - t0:.0f} s, "
              f"decoded {counts['ok']}, rejected {counts['rejected']}", flush=True)

    import atexit

    atexit.register(report)
    warnings.simplefilter("ignore", RuntimeWarning)
    atheris.Setup([argv[0], CORPUS, "-rss_limit_mb=2048", "-timeout=10"] + argv[1:], test_one)
    atheris.Fuzz()


def run_hypothesis(seconds: float):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from streamlev.sketch import LevSketch

    seeds = _seeds()
    counts = {"ok": 0, "rejected": 0}

    @st.composite
    def inputs(draw):
        how = draw(st.sampled_from(["binary", "edit", "splice", "truncate"]))
        if how == "binary":
            return draw(st.binary(max_size=1024))  # its first byte is the control byte
        b = bytearray(draw(st.sampled_from(seeds)))
        if how == "truncate":
            return b"\x01" + bytes(b[: draw(st.integers(0, len(b)))])
        if how == "splice":
            other = draw(st.sampled_from(seeds))
            i, j = draw(st.integers(0, len(b))), draw(st.integers(0, len(other)))
            return b"\x01" + bytes(b[:i]) + other[j:]
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.integers(0, 255))
        return bytes([draw(st.integers(0, 255))]) + bytes(b)

    @settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs())
    def fuzz(data):
        counts[one_input(data, LevSketch)] += 1

    warnings.simplefilter("ignore", RuntimeWarning)
    t0 = time.time()
    try:
        while time.time() - t0 < seconds:  # fresh random batches until the time is up
            fuzz()
    finally:
        n = sum(counts.values())
        print(f"[fuzz_from_bytes] hypothesis: {n} executions in {time.time() - t0:.0f} s, "
              f"decoded {counts['ok']}, rejected {counts['rejected']}", flush=True)


if __name__ == "__main__":
    if "--hypothesis" in sys.argv:
        secs = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 60.0
        run_hypothesis(secs)
    else:
        try:
            import atheris  # noqa: F401
        except ImportError:
            print("atheris is not installed: falling back to --hypothesis (pip install atheris)", file=sys.stderr)
            run_hypothesis(60.0)
        else:
            run_atheris(sys.argv)
