import numpy as np
import pytest

import streamlev as sl
from streamlev.io import iter_npy_chunks


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
