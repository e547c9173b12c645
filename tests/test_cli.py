"""The ``streamlev`` command: demo verification, select on every file type, save/merge/inspect, user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamlev as sl
from streamlev import _cli_select as cli_select
from streamlev import cli
from streamlev.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _keys(n=3000, d=6, seed=7):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) * rng.lognormal(0.0, 1.0, (n, 1))


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, out, err):
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamlev: error: ")
    assert "Traceback" not in err


def _no_near_ties(K, eps, tol=1e-9):
    # exact set equality is promised away from the accuracy band around eps
    tau = sl.leverage_scores(K)
    assert np.min(np.abs(tau - eps)) > tol


# ------------------------------------------------------------------------- demo
def _demo_table(out):
    return [[float(x.replace(",", "")) for x in ln.split()] for ln in out.splitlines()
            if re.fullmatch(r"\s*[\d,]+\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+[\d.]+", ln)]


def test_demo_shows_flat_memory_on_a_long_real_stream_and_verifies_it(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _run(capsys, "demo")
    assert rc == 0, out + err
    assert "FAILED" not in out and "Traceback" not in err
    assert "U equals the exact offline set {j : tau_j >= 0.01} (SVD of all keys, streamlev.reference): yes." in out
    assert "all on keys in U." in out
    assert "18,432 real keys" in out and "floor(d/eps) = 3,200" in out
    rows = _demo_table(out)
    assert len(rows) == cli._cli_demo.ROWS
    seen = [r[0] for r in rows]
    assert seen == sorted(seen) and seen[-1] == 18_432 > 3_200  # a stream much longer than d/eps
    for seen_i, keys_kib, sketch_kib, u, _ in rows:
        assert u <= 3_200 and keys_kib == seen_i * 32 * 8 / 1024
    assert rows[-1][2] < rows[-1][1] / 4  # the sketch ends far smaller than the keys it has seen
    assert rows[-1][2] == rows[1][2]  # flat: no growth over the second half of the stream
    # every column is explained, compilation is kept out of the timings, and it says where it does not pay off
    for word in ("keys seen:", "keys KiB:", "sketch KiB:", "|U|:", "time ms:", "not counted", "Limit: one head",
                 "Softmax has no universal set"):
        assert word in out, word
    assert len(out.splitlines()) <= 30
    assert not list(tmp_path.iterdir())  # no plot unless --plot is given


def test_demo_plot_on_request(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    rc, out, err = _run(capsys, "demo", "--plot", png, "--quiet", "--layers", "0")
    assert rc == 0, out + err
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_plot_with_a_bad_extension_fails_before_running(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli._cli_demo, "run", lambda *a, **k: pytest.fail("the demo ran before the check"))
    rc, out, err = _run(capsys, "demo", "--plot", tmp_path / "out.txt")
    _assert_one_line_error(rc, out, err)
    assert "'.txt'" in err and ".png" in err
    rc, out, err = _run(capsys, "demo", "--plot", tmp_path / "no" / "dir" / "x.png")
    _assert_one_line_error(rc, out, err)


def test_demo_fails_loudly_when_the_set_misses_a_heavy_key(capsys, monkeypatch):
    real = sl.LevSketch.universal_set

    def drop_first(self, eps=None):
        return real(self, eps)[1:]  # a broken sketch: loses one key of U

    monkeypatch.setattr(sl.LevSketch, "universal_set", drop_first)
    rc, out, _ = _run(capsys, "demo", "--layers", "0", "--quiet")
    assert rc == 1
    assert "FAILED" in out and "all on keys in U" not in out


def test_python_dash_m_entry_point_runs_the_demo():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "streamlev", "demo", "--no-plot", "--quiet", "--layers", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all on keys in U" in r.stdout
    assert "Traceback" not in r.stderr


def test_demo_needs_no_matplotlib_unless_asked_for_a_plot(tmp_path):
    # as after a plain `pip install .`: matplotlib cannot be imported
    code = ("import sys; sys.modules['matplotlib'] = None; from streamlev.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code, "demo", "--quiet", "--layers", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "all on keys in U" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code, "demo", "--plot", "x.png"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("streamlev: error: --plot needs matplotlib") and len(r.stderr.splitlines()) == 1
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------- select
def _write(fmt, path, arrays):
    if fmt == "npy":
        (arr,) = arrays.values()
        np.save(path, arr)
    elif fmt == "npz":
        np.savez(path, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_select_equals_offline_universal_set(capsys, tmp_path, fmt, dtype):
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    K = _keys().astype(dtype)
    eps = 0.02
    _no_near_ties(K, eps)
    f = tmp_path / f"keys.{fmt}"
    _write(fmt, f, {"k": K})
    # chunk 1000 over 3000 rows: several chunks, result must not depend on it
    rc, out, err = _run(capsys, "select", f, "--eps", eps, "--chunk", 1000, "--json", "--quiet")
    assert rc == 0, err
    res = json.loads(out)
    want = sl.universal_set(K, eps)
    np.testing.assert_array_equal(res["ids"], want)
    np.testing.assert_allclose(res["scores"], sl.leverage_scores(K)[want], rtol=1e-9)
    assert (res["n"], res["d"], res["eps"], res["p"]) == (3000, 6, eps, 2.0)
    assert res["num_retained"] == len(res["ids"]) <= res["bound"] == int(6 / eps)
    assert res["seconds"] >= 0 and all(s >= eps for s in res["scores"])
    assert res["ids"] == sorted(res["ids"])

    # the text output lists the same set
    rc, out, _ = _run(capsys, "select", f, "--eps", eps)
    assert rc == 0
    rows = [ln.split("\t") for ln in out.splitlines() if not ln.startswith("#")]
    assert [int(r[0]) for r in rows] == want.tolist()
    np.testing.assert_allclose([float(r[1]) for r in rows], res["scores"], rtol=1e-11)
    assert f"|U| = {want.size}" in out


def test_select_picks_named_array_and_id_offset(capsys, tmp_path):
    K = _keys(800, 4)
    f = tmp_path / "many.npz"
    np.savez(f, queries=K[::-1], keys=K)
    rc, out, _ = _run(capsys, "select", f, "--key", "keys", "--eps", 0.05, "--id-offset", 10_000, "--json")
    assert rc == 0
    np.testing.assert_array_equal(json.loads(out)["ids"], 10_000 + sl.universal_set(K, 0.05))


def test_select_reads_safetensors_lazily_by_rows(capsys, tmp_path, monkeypatch):
    pytest.importorskip("safetensors")
    K = _keys(2500, 5)
    f = tmp_path / "k.safetensors"
    _write("safetensors", f, {"k": K, "other": K[:3]})
    sizes = []
    real_update = sl.LevSketch.update

    def spy(self, keys, *a, **kw):
        sizes.append(np.shape(keys)[0])
        return real_update(self, keys, *a, **kw)

    monkeypatch.setattr(sl.LevSketch, "update", spy)
    rc, out, _ = _run(capsys, "select", f, "--key", "k", "--eps", 0.05, "--chunk", 1000, "--json")
    assert rc == 0
    assert sizes == [1000, 1000, 500]
    np.testing.assert_array_equal(json.loads(out)["ids"], sl.universal_set(K, 0.05))


def test_save_merge_inspect_round_trip_equals_sketch_of_concatenation(capsys, tmp_path):
    K = _keys(4000, 6, seed=3)
    eps = 0.02
    _no_near_ties(K, eps)
    parts = [(0, 1500), (1500, 2600), (2600, 4000)]
    files = []
    for i, (a, b) in enumerate(parts):
        np.save(tmp_path / f"p{i}.npy", K[a:b])
        files.append(tmp_path / f"p{i}.sk")
        rc, _, err = _run(capsys, "select", tmp_path / f"p{i}.npy", "--eps", eps, "--id-offset", a,
                          "--save", files[-1], "--quiet")
        assert rc == 0, err
    merged = tmp_path / "merged.sk"
    rc, out, err = _run(capsys, "merge", *files, "-o", merged)
    assert rc == 0, err
    assert "merged 3 sketches" in out
    direct = sl.LevSketch(6, eps).update(K)
    got = sl.LevSketch.from_bytes(merged.read_bytes())
    assert got.n == direct.n == 4000
    np.testing.assert_array_equal(got.universal_set(), direct.universal_set())
    np.testing.assert_array_equal(got.universal_set(), sl.universal_set(K, eps))
    (gi, gs), (di, ds) = got.scores(), direct.scores()
    np.testing.assert_array_equal(gi, di)
    np.testing.assert_allclose(gs, ds, rtol=1e-10)
    # inputs are left as they were
    for i, (a, b) in enumerate(parts):
        assert sl.LevSketch.from_bytes(files[i].read_bytes()).n == b - a

    rc, out, _ = _run(capsys, "inspect", merged, "--json", "--top", 5)
    assert rc == 0
    info = json.loads(out)
    assert info["kind"] == "LevSketch"
    assert (info["d"], info["eps"], info["p"], info["n"]) == (6, eps, 2.0, 4000)
    assert info["num_retained"] == direct.num_retained and info["bound"] == int(6 / eps)
    assert info["nbytes"] == got.nbytes and info["file_bytes"] == merged.stat().st_size
    order = np.argsort(-ds, kind="stable")[:5]
    assert [t["id"] for t in info["top"]] == di[order].tolist()
    np.testing.assert_allclose([t["score"] for t in info["top"]], ds[order], rtol=1e-10)

    rc, out, _ = _run(capsys, "inspect", merged)
    assert rc == 0 and "LevSketch" in out and "num_retained" in out


def test_other_p_uses_lpsketch_or_says_it_is_missing(capsys, tmp_path):
    np.save(tmp_path / "k.npy", _keys(200, 3))
    rc, out, err = _run(capsys, "select", tmp_path / "k.npy", "--p", 3, "--eps", 0.2, "--json")
    if hasattr(sl, "LpSketch"):
        assert rc == 0, err
        res = json.loads(out)
        assert res["p"] == 3.0
        direct = sl.LpSketch(3, 0.2, p=3.0).update(_keys(200, 3))  # one chunk: the same single update
        np.testing.assert_array_equal(res["ids"], direct.universal_set())
        assert res["bound"] == sl.LpSketch.max_retained(3, 0.2, 3.0)
    else:
        _assert_one_line_error(rc, out, err)
        assert "LpSketch" in err


# ------------------------------------------------------------------ user errors
@pytest.fixture
def files(tmp_path):
    K = _keys(300, 4)
    np.save(tmp_path / "k.npy", K)
    np.save(tmp_path / "k1.npy", K[:, 0])
    np.save(tmp_path / "k3.npy", K.reshape(3, 100, 4))
    np.save(tmp_path / "str.npy", np.array([["a", "b"], ["c", "d"]]))
    bad = K.copy()
    bad[123, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    np.savez(tmp_path / "two.npz", a=K, b=K)
    (tmp_path / "k.csv").write_text("1,2\n")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all")
    for ext in ("npy", "npz", "safetensors"):
        np.savetxt(tmp_path / f"text.{ext}", K[:5])
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "k.npy").read_bytes()[:-100])
    sk = sl.LevSketch(4, 0.1).update(K)
    data = sk.to_bytes()
    (tmp_path / "good.sk").write_bytes(data)
    (tmp_path / "flip.sk").write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    (tmp_path / "trunc.sk").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.sk").write_bytes(b"hello world, not a sketch")
    (tmp_path / "d5.sk").write_bytes(sl.LevSketch(5, 0.1).update(_keys(50, 5)).to_bytes())
    try:
        from safetensors.numpy import save_file

        save_file({"k": K}, str(tmp_path / "k.safetensors"))
    except ImportError:
        pass
    return tmp_path


ERRORS = {
    "missing file": (["select", "{t}/nope.npy"], "no such file"),
    "missing sketch": (["inspect", "{t}/nope.sk"], "no such file"),
    "npz needs --key": (["select", "{t}/two.npz"], "--key"),
    "wrong npz name": (["select", "{t}/two.npz", "--key", "zz"], "no array named 'zz'"),
    "wrong tensor name": (["select", "{t}/k.safetensors", "--key", "zz"], "no tensor named 'zz'"),
    "1-D array": (["select", "{t}/k1.npy"], "expected keys of shape (n, d)"),
    "3-D array, bad --index": (["select", "{t}/k3.npy", "--index", "3"], "does not fit"),
    "--index on a 2-D array": (["select", "{t}/k.npy", "--index", "0"], "--index applies to arrays with group axes"),
    "--save with several groups": (["select", "{t}/k3.npy", "--save", "{t}/x.sk"], "choose one with --index"),
    "string dtype": (["select", "{t}/str.npy"], "expected real numbers"),
    "NaN in data": (["select", "{t}/nan.npy"], "row 123 holds NaN"),
    "eps zero": (["select", "{t}/k.npy", "--eps", "0"], "eps must be in [2.22e-16, 1]"),
    "eps too big": (["demo", "--eps", "1.5"], "eps must be in [2.22e-16, 1]"),
    "eps below float64 resolution (select)": (["select", "{t}/k.npy", "--eps", "1e-300"], "eps must be in [2.22e-16"),
    "eps below float64 resolution (demo)": (["demo", "--eps", "1e-20"], "eps must be in [2.22e-16"),
    "id-offset at int64 max": (["select", "{t}/k.npy", "--id-offset", "9223372036854775807"],
                               "use --id-offset <= 9223372036854775508"),
    "id-offset beyond int64": (["select", "{t}/k.npy", "--id-offset", "9223372036854775808"], "id-offset must be"),
    "inspect --eps below the sketch's": (["inspect", "{t}/good.sk", "--eps", "0.05"], "below the sketch's eps"),
    "bad max-memory": (["select", "{t}/k.npy", "--max-memory", "lots"], "max-memory must be a size"),
    "eps not a number": (["select", "{t}/k.npy", "--eps", "abc"], "eps must be a number"),
    "negative p": (["select", "{t}/k.npy", "--p", "-1"], "p must be"),
    "bad chunk": (["select", "{t}/k.npy", "--chunk", "0"], "chunk must be"),
    "unknown extension": (["select", "{t}/k.csv"], "unsupported file type"),
    "not a npy": (["select", "{t}/garbage.npy"], "is not a .npy file"),
    "text file named .npy": (["select", "{t}/text.npy"], "is not a .npy file: it starts with b'"),
    "text file named .npz": (["select", "{t}/text.npz"], "is not a .npz archive"),
    "text file named .safetensors": (["select", "{t}/text.safetensors"], "is not a .safetensors file"),
    "truncated npy": (["select", "{t}/trunc.npy"], "is truncated"),
    "--key on npy": (["select", "{t}/k.npy", "--key", "x"], "--key applies"),
    "corrupt sketch (bit flip)": (["inspect", "{t}/flip.sk"], "checksum"),
    "truncated sketch": (["inspect", "{t}/trunc.sk"], "corrupt"),
    "not a sketch": (["merge", "{t}/junk.sk", "{t}/good.sk", "-o", "{t}/o.sk"], "not a streamlev sketch"),
    "incompatible merge": (["merge", "{t}/good.sk", "{t}/d5.sk", "-o", "{t}/o.sk"], "cannot merge"),
    "merge without -o": (["merge", "{t}/good.sk"], "-o"),
    "unwritable output": (["select", "{t}/k.npy", "--save", "{t}/no/such/dir/x.sk"], "cannot write"),
    "bad layers": (["demo", "--layers", "9", "--no-plot"], "--layers"),
    "no subcommand": ([], "required"),
    "unknown subcommand": (["frobnicate"], "invalid choice"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line_with_exit_code_2(capsys, files, case):
    argv, needle = ERRORS[case]
    if "safetensors" in " ".join(argv):
        pytest.importorskip("safetensors")
    rc, out, err = _run(capsys, *[a.format(t=files) for a in argv])
    _assert_one_line_error(rc, out, err)
    assert needle in err
    assert "allow_pickle" not in err  # never name a keyword a CLI user cannot pass


def test_failed_merge_writes_nothing(capsys, files):
    rc, out, err = _run(capsys, "merge", files / "good.sk", files / "d5.sk", "-o", files / "o.sk")
    _assert_one_line_error(rc, out, err)
    assert not (files / "o.sk").exists()
    assert not [p for p in os.listdir(files) if ".tmp" in p]


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    assert "select" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert sl.__version__ in capsys.readouterr().out


def test_progress_bar_off_when_stderr_is_not_a_tty(capsys, files):
    rc, out, err = _run(capsys, "select", files / "k.npy", "--chunk", 50)
    assert rc == 0 and err == ""  # capsys stderr is not a TTY: no progress bar


def test_sketch_kind_header_parser():
    data = sl.LevSketch(3, 0.5).to_bytes()
    assert cli._sketch_kind(data) == "LevSketch"
    assert cli._sketch_kind(b"nope") is None


# ------------------------------------------------------- issue #19: first-hour defects
@pytest.mark.parametrize("shape", [(3, 100_000), (64, 20_000)])
def test_select_refuses_fewer_keys_than_dimensions_with_a_transpose_hint(capsys, tmp_path, shape):
    # before: np.zeros((d, d)) asked for 74.5 GiB (traceback), or ran for minutes at d = 20,000
    f = tmp_path / "wide.npy"
    np.save(f, np.ones(shape, dtype=np.float16))
    rc, out, err = _run(capsys, "select", f)
    _assert_one_line_error(rc, out, err)
    assert "did you mean the transpose" in err.lower() and f"({shape[1]}, {shape[0]})" in err


def test_select_refuses_a_problem_bigger_than_the_memory_limit(capsys, tmp_path, monkeypatch):
    f = tmp_path / "k.npy"
    np.save(f, _keys(3000, 300).astype(np.float32))
    rc, out, err = _run(capsys, "select", f, "--max-memory", "1M")
    _assert_one_line_error(rc, out, err)
    assert "GiB" in err and "--max-memory" in err
    monkeypatch.setattr(cli_select, "_default_max_memory", lambda: 1 << 20)  # the default limit applies too
    rc, out, err = _run(capsys, "select", f)
    _assert_one_line_error(rc, out, err)
    rc, _, err = _run(capsys, "select", f, "--max-memory", "1G", "--quiet")
    assert rc == 0, err


def test_estimate_covers_the_measured_peak(tmp_path):
    import tracemalloc

    n, d, eps, chunk = 3000, 40, 0.05, 1000
    K = _keys(n, d)
    tracemalloc.start()
    sk = sl.LevSketch(d, eps)
    for s in range(0, n, chunk):
        sk.update(K[s : s + chunk], ids=np.arange(s, s + chunk))
    sk.scores()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= cli_select._estimate_bytes(n, d, sl.LevSketch.max_retained(d, eps), chunk)


def test_id_offset_up_to_the_int64_maximum_gives_exact_ids(capsys, tmp_path):
    K = _keys(300, 4)
    K[-1] *= 1e3  # the last row (id int64 max) is in U
    f = tmp_path / "k.npy"
    np.save(f, K)
    top = np.iinfo(np.int64).max
    rc, out, err = _run(capsys, "select", f, "--eps", 0.02, "--json", "--id-offset", top - 299)
    assert rc == 0, err
    want = sl.universal_set(K, 0.02)
    assert json.loads(out)["ids"] == [top - 299 + int(j) for j in want]  # Python ints: no wrap-around
    assert 299 in want and json.loads(out)["ids"][-1] == top
    rc, out, err = _run(capsys, "select", f, "--json", "--id-offset", top - 298)  # one row too many
    _assert_one_line_error(rc, out, err)


def test_bound_shown_for_general_p_is_the_one_used(capsys, tmp_path):
    np.save(tmp_path / "k.npy", _keys(200, 4))
    rc, out, _ = _run(capsys, "select", tmp_path / "k.npy", "--p", 3, "--eps", 0.5)
    assert rc == 0
    assert f"floor(d^1.5/eps) = {sl.LpSketch.max_retained(4, 0.5, 3.0)}" in out and "floor(d/eps)" not in out
    assert "upper bounds" in out
    rc, out, _ = _run(capsys, "select", tmp_path / "k.npy", "--p", 1, "--eps", 0.5)
    assert f"floor(d/eps) = {sl.LpSketch.max_retained(4, 0.5, 1.0)}" in out


def test_merge_of_overlapping_shards_suggests_id_offset(capsys, tmp_path):
    K = _keys(600, 4)
    np.save(tmp_path / "a.npy", K[:300])
    np.save(tmp_path / "b.npy", K[300:])
    for x in "ab":
        assert _run(capsys, "select", tmp_path / f"{x}.npy", "--save", tmp_path / f"{x}.sk", "--quiet")[0] == 0
    rc, out, err = _run(capsys, "merge", tmp_path / "a.sk", tmp_path / "b.sk", "-o", tmp_path / "m.sk")
    _assert_one_line_error(rc, out, err)
    assert "--id-offset" in err and "np.arange" not in err and "ids=" not in err
    assert _run(capsys, "select", tmp_path / "b.npy", "--id-offset", 300, "--save", tmp_path / "b.sk",
                "--quiet")[0] == 0
    assert _run(capsys, "merge", tmp_path / "a.sk", tmp_path / "b.sk", "-o", tmp_path / "m.sk")[0] == 0


# ------------------------------------------------------------ the files people have
def _save_bf16_safetensors(path, name, x32):
    """A bfloat16 .safetensors file written by hand (round to nearest even): needs neither torch nor safetensors."""
    bits = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32)
    bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    header = json.dumps({name: {"dtype": "BF16", "shape": list(x32.shape), "data_offsets": [0, bf.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    Path(path).write_bytes(len(header).to_bytes(8, "little") + header + bf.tobytes())
    return (bf.astype(np.uint32) << 16).view(np.float32)  # the values on disk


def test_select_reads_bfloat16_safetensors(capsys, tmp_path):
    K = _keys(2000, 8).astype(np.float32)
    f = tmp_path / "k.safetensors"
    on_disk = _save_bf16_safetensors(f, "keys", K)
    rc, out, err = _run(capsys, "select", f, "--eps", 0.02, "--chunk", 700, "--json")
    assert rc == 0, err
    np.testing.assert_array_equal(json.loads(out)["ids"], sl.universal_set(on_disk.astype(np.float64), 0.02))


def test_select_reads_torch_bfloat16_safetensors_like_torch(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    K = torch.from_numpy(_keys(1500, 8)).to(torch.bfloat16)
    f = tmp_path / "kv.safetensors"
    st.save_file({"k": K, "v": K.flip(0)}, str(f))
    rc, out, err = _run(capsys, "select", f, "--key", "k", "--eps", 0.02, "--json")
    assert rc == 0, err
    np.testing.assert_array_equal(json.loads(out)["ids"], sl.universal_set(K.float().double().numpy(), 0.02))


def _qkv_like_extract_keys(path, L=2, H=3, n=300, d=4):
    rng = np.random.default_rng(1)
    k = (rng.standard_normal((L, H, n, d)) * rng.lognormal(0, 1, (L, H, n, 1))).astype(np.float16)
    np.savez(path, q=k[..., ::-1, :], k=k, v=k, tokens=np.arange(n, dtype=np.int32))
    return k.astype(np.float64)


def test_select_sketches_every_head_of_a_layers_heads_array(capsys, tmp_path):
    f = tmp_path / "qkv.npz"
    k = _qkv_like_extract_keys(f)  # the layout of examples/extract_keys.py output
    rc, out, err = _run(capsys, "select", f)
    _assert_one_line_error(rc, out, err)
    assert "holds 4 arrays ['q', 'k', 'v', 'tokens']; choose one with --key NAME" in err and "cannot read" not in err
    rc, out, err = _run(capsys, "select", f, "--key", "k", "--eps", 0.05, "--json")
    assert rc == 0, err
    groups = json.loads(out)["groups"]
    assert [tuple(g["index"]) for g in groups] == list(np.ndindex(2, 3))
    for g in groups:
        np.testing.assert_array_equal(g["ids"], sl.universal_set(k[tuple(g["index"])], 0.05))
    rc, out, _ = _run(capsys, "select", f, "--key", "k", "--eps", 0.05)
    assert rc == 0 and out.count("# group (") == 6
    lines = [ln.split("\t") for ln in out.splitlines() if not ln.startswith("#")]
    assert {ln[0] for ln in lines} <= {f"{a},{b}" for a, b in np.ndindex(2, 3)}
    # one head, and the sketch of it saved
    rc, out, err = _run(capsys, "select", f, "--key", "k", "--index", "1,-1", "--eps", 0.05, "--json",
                        "--save", tmp_path / "h.sk")
    assert rc == 0, err
    np.testing.assert_array_equal(json.loads(out)["ids"], sl.universal_set(k[1, 2], 0.05))


def test_budget_gives_the_exact_top_b_by_leverage(capsys, tmp_path):
    K = _keys(3000, 6)
    np.save(tmp_path / "k.npy", K)
    tau = sl.leverage_scores(K)
    for b in (1, 7, 40):
        rc, out, err = _run(capsys, "select", tmp_path / "k.npy", "--budget", b, "--json", "--chunk", 1000)
        assert rc == 0, err
        res = json.loads(out)
        np.testing.assert_array_equal(res["ids"], np.sort(np.argsort(-tau, kind="stable")[:b]))
        np.testing.assert_allclose(res["scores"], tau[res["ids"]], rtol=1e-9)
    # with an explicit eps that is too high, it says so instead of guessing
    rc, out, _ = _run(capsys, "select", tmp_path / "k.npy", "--budget", 40, "--eps", 0.5)
    assert rc == 0 and "fewer than --budget 40" in out and "smaller --eps" in out


def test_inspect_lists_rethresholds_and_cuts_a_saved_sketch(capsys, tmp_path):
    K = _keys(2000, 5)
    _no_near_ties(K, 0.01)
    _no_near_ties(K, 0.04)
    np.save(tmp_path / "k.npy", K)
    sk_file = tmp_path / "k.sk"
    assert _run(capsys, "select", tmp_path / "k.npy", "--eps", 0.01, "--save", sk_file, "--quiet")[0] == 0
    rc, out, _ = _run(capsys, "inspect", sk_file, "--all", "--json")
    assert rc == 0
    np.testing.assert_array_equal(json.loads(out)["ids"], sl.universal_set(K, 0.01))
    rc, out, _ = _run(capsys, "inspect", sk_file, "--eps", 0.04, "--all")
    rows = [ln.split("\t") for ln in out.splitlines() if re.match(r"^\d+\t", ln)]
    assert [int(r[0]) for r in rows] == sl.universal_set(K, 0.04).tolist()
    rc, out, _ = _run(capsys, "inspect", sk_file, "--budget", 3, "--all", "--json")
    tau = sl.leverage_scores(K)
    assert json.loads(out)["ids"] == sorted(np.argsort(-tau)[:3].tolist())
    rc, out, _ = _run(capsys, "inspect", sk_file)
    assert "nbytes: memory of the sketch's arrays" in out and "file_bytes: the serialized sketch" in out


def test_inspect_says_lp_scores_are_capped_upper_bounds(capsys, tmp_path):
    np.save(tmp_path / "k.npy", _keys(300, 3))
    sk_file = tmp_path / "k.sk"
    assert _run(capsys, "select", tmp_path / "k.npy", "--p", 3, "--eps", 0.2, "--save", sk_file, "--quiet")[0] == 0
    rc, out, _ = _run(capsys, "inspect", sk_file)
    assert rc == 0 and "LpSketch" in out
    assert "upper bounds" in out and "capped at 1" in out


def test_inspect_a_saved_multihead_sketch(capsys, tmp_path):
    K = np.random.default_rng(0).standard_normal((3, 200, 4))
    mh = sl.MultiHeadSketch(3, 4, 0.05)
    mh.update(K)
    (tmp_path / "mh.sk").write_bytes(mh.to_bytes())
    rc, out, _ = _run(capsys, "inspect", tmp_path / "mh.sk", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["kind"] == "MultiHeadSketch" and info["heads"] == 3
    assert info["num_retained"] == mh.num_retained.tolist() and info["n"] == [200, 200, 200]
