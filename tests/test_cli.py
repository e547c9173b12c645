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
def test_demo_verifies_every_heavy_entry_and_reports_softmax(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "demo.png"
    rc, out, err = _run(capsys, "demo", "--plot", png)
    assert rc == 0, out + err
    assert "all in U" in out and "FAILED" not in out
    assert "72/72 heads" in out  # U equals the exact offline set on every head
    m = re.search(r"(\d+) heavy entries A_ij >= 0.1 checked \((\d+) from the real queries, (\d+) from", out)
    assert m, out
    total, real, worst = map(int, m.groups())
    # 16 + 14604 on the shipped sample: every key of U is heavy for its own worst-case query
    assert total == real + worst and real >= 1 and worst >= 14_000
    assert "largest-norm keys" in out and "random keys" in out and "does NOT cover" in out
    table = [ln.split() for ln in out.splitlines() if ln[:5].strip().isdigit()]
    assert len(table) == 72
    for row in table:  # layer head n |U| d/eps KiB ms in/out
        assert int(row[3]) <= int(row[4]) == 320
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_fails_loudly_when_the_set_misses_a_heavy_key(capsys, monkeypatch):
    real = sl.LevSketch.universal_set

    def drop_first(self, eps=None):
        return real(self, eps)[1:]  # a broken sketch: loses one key of U

    monkeypatch.setattr(sl.LevSketch, "universal_set", drop_first)
    rc, out, _ = _run(capsys, "demo", "--layers", "0", "--no-plot", "--quiet")
    assert rc == 1
    assert "FAILED" in out and "all in U" not in out


def test_python_dash_m_entry_point_runs_the_demo():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "streamlev", "demo", "--no-plot", "--quiet"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all in U" in r.stdout
    assert "Traceback" not in r.stderr


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
    "1-D array": (["select", "{t}/k1.npy"], "expected 2-D"),
    "3-D array": (["select", "{t}/k3.npy"], "expected 2-D"),
    "string dtype": (["select", "{t}/str.npy"], "expected real numbers"),
    "NaN in data": (["select", "{t}/nan.npy"], "row 123 holds NaN"),
    "eps zero": (["select", "{t}/k.npy", "--eps", "0"], "eps must be in (0, 1]"),
    "eps too big": (["demo", "--eps", "1.5"], "eps must be in (0, 1]"),
    "eps not a number": (["select", "{t}/k.npy", "--eps", "abc"], "eps must be a number"),
    "negative p": (["select", "{t}/k.npy", "--p", "-1"], "p must be"),
    "bad chunk": (["select", "{t}/k.npy", "--chunk", "0"], "chunk must be"),
    "unknown extension": (["select", "{t}/k.csv"], "unsupported file type"),
    "not a npy": (["select", "{t}/garbage.npy"], "cannot read"),
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
