import json

import numpy as np
import pytest

import streamlev as sl
from streamlev.io import bf16_to_float32, iter_npy_chunks, open_keys, read_npy_header, read_safetensors_header


def test_iter_npy_chunks_covers_the_file_in_order(tmp_path):
    K = np.random.default_rng(0).standard_normal((1003, 5)).astype(np.float32)
    path = tmp_path / "k.npy"
    np.save(path, K)
    seen = []
    sk = sl.LevSketch(5, 0.05)
    for start, block in iter_npy_chunks(path, 100):
        seen.append((start, len(block)))
        np.testing.assert_array_equal(block, K[start : start + len(block)])
        sk.update(block, ids=np.arange(start, start + len(block)))
    assert seen[0] == (0, 100) and seen[-1] == (1000, 3) and sum(m for _, m in seen) == 1003
    np.testing.assert_array_equal(sk.universal_set(), sl.universal_set(K, 0.05))


def test_iter_npy_chunks_rejects_bad_files(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(10))
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((4, 3))))
    with pytest.raises(ValueError, match="2-D"):
        list(iter_npy_chunks(tmp_path / "v.npy"))
    with pytest.raises(ValueError, match="Fortran"):
        list(iter_npy_chunks(tmp_path / "f.npy"))
    with pytest.raises(ValueError, match="chunk_rows"):
        list(iter_npy_chunks(tmp_path / "v.npy", 0))


# ------------------------------------------------ foreign files get a message that says what they are
@pytest.fixture
def text_npy(tmp_path):
    path = tmp_path / "keys.npy"
    np.savetxt(path, np.ones((3, 2)))  # a text file under a .npy name
    return path


def test_text_file_named_npy_is_recognised_everywhere(text_npy):
    with pytest.raises(ValueError, match=r"is not a \.npy file: it starts with b'1\.0") as e1:
        read_npy_header(text_npy)
    with pytest.raises(ValueError, match=r"not a \.npy file") as e2:
        list(iter_npy_chunks(text_npy))
    with pytest.raises(ValueError, match=r"not a \.npy file") as e3:
        open_keys(text_npy)
    for e in (e1, e2, e3):
        assert "allow_pickle" not in str(e.value) and "pickled" not in str(e.value)


def test_dask_from_npy_recognises_a_text_file(text_npy):
    pytest.importorskip("dask.array")
    from streamlev.dask import from_npy

    with pytest.raises(ValueError, match=r"from_npy: .*not a \.npy file") as e:
        from_npy(text_npy, chunks=10)
    assert "allow_pickle" not in str(e.value)


def test_damaged_files_are_refused_with_what_is_wrong(tmp_path):
    np.save(tmp_path / "k.npy", np.ones((100, 4)))
    (tmp_path / "t.npy").write_bytes((tmp_path / "k.npy").read_bytes()[:-8])
    np.save(tmp_path / "o.npy", np.array([[None, 1]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="truncated"):
        read_npy_header(tmp_path / "t.npy")
    with pytest.raises(ValueError, match="Python objects"):
        read_npy_header(tmp_path / "o.npy")
    np.savez(tmp_path / "o.npz", k=np.array([[None, 1]], dtype=object))
    with pytest.raises(ValueError, match="Python objects") as e:
        open_keys(tmp_path / "o.npz")
    assert "allow_pickle" not in str(e.value)
    good = _st_bytes({"k": ("F32", [2, 3], np.arange(6, dtype="<f4").tobytes())})
    (tmp_path / "cut.safetensors").write_bytes(good[:-4])
    with pytest.raises(ValueError, match="outside the file"):
        open_keys(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="no tensor named 'x'"):
        (tmp_path / "ok.safetensors").write_bytes(good)
        open_keys(tmp_path / "ok.safetensors", "x")


# ------------------------------------------------------------------------ safetensors and bfloat16
def _st_bytes(tensors):
    header, data, off = {}, b"", 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + data


def test_bf16_to_float32_matches_torch_on_every_bit_pattern():
    torch = pytest.importorskip("torch")
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    got = bf16_to_float32(bits)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # bit-exact, NaN payloads included


def test_open_keys_reads_safetensors_written_by_the_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    K = np.random.default_rng(0).standard_normal((2, 50, 3))
    st.save_file({"k": K, "z": K[0].astype(np.float16)}, str(tmp_path / "a.safetensors"))
    src = open_keys(tmp_path / "a.safetensors", "k")
    assert (src.name, src.shape, src.dtype) == ("k", (2, 50, 3), "float64")
    np.testing.assert_array_equal(src.rows(10, 20, (1,)), K[1, 10:20])
    assert read_safetensors_header(tmp_path / "a.safetensors")["z"][:2] == ("F16", (50, 3))


def test_open_keys_reads_torch_bfloat16_rows_lazily(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    K = torch.randn(3, 4, 100, 8).to(torch.bfloat16)  # (layers, heads, n, d)
    st.save_file({"keys": K}, str(tmp_path / "k.safetensors"))
    src = open_keys(tmp_path / "k.safetensors")
    assert (src.shape, src.dtype) == ((3, 4, 100, 8), "bfloat16")
    block = src.rows(30, 60, (2, 1))
    assert block.dtype == np.float32
    np.testing.assert_array_equal(block, K[2, 1, 30:60].float().numpy())
