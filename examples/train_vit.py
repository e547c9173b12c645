"""Train a small vision transformer with LevAttention, offline on CPU (the paper's training claim, small).

Data: scikit-learn's digits (1797 8x8 images, shipped with the package),
upsampled to 16x16 and cut into 2x2 patches: 64 patch tokens + 1 CLS token.
Three ways, same seed, same initial weights, same epochs:

  (a) full softmax attention (torch.nn.MultiheadAttention);
  (b) LevAttention top-k trained from scratch (k = 16 and 8 of 65 tokens by default);
  (c) the trained model (a) evaluated with LevAttention top-k swapped in, without retraining.

    python examples/train_vit.py                        # 3 seeds, the table in docs/training.md
    python examples/train_vit.py --epochs 1 --seeds 0 --train-limit 64 --test-limit 64  # seconds

Needs torch and scikit-learn. Uses one thread by default (--threads).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time

import numpy as np


def load_digits_tokens(upsample: int, seed: int = 0):
    """(train_x, train_y, test_x, test_y): images (N, 1, 8*upsample, 8*upsample) in [0, 1], a fixed stratified split."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    if upsample > 1:
        X = torch.nn.functional.interpolate(X, scale_factor=upsample, mode="bilinear", align_corners=False)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=y, random_state=seed)
    y = torch.tensor(y)
    return X[idx_tr], y[idx_tr], X[idx_te], y[idx_te]


def build_vit(*, image: int, patch: int, dim: int, depth: int, heads: int, classes: int = 10):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            n = (image // patch) ** 2
            self.patch = patch
            self.embed = nn.Linear(patch * patch, dim)
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

        def forward(self, img):
            p = self.patch
            t = img.unfold(2, p, p).unfold(3, p, p).reshape(img.shape[0], -1, p * p)  # (B, n, p*p), row-major
            x = torch.cat([self.cls.expand(img.shape[0], -1, -1), self.embed(t)], dim=1) + self.pos
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.norm(x[:, 0]))

    return ViT()


def with_levattention(model, budget: int):
    """A copy of ``model`` whose attention layers are LevAttention(top-``budget``, CLS kept), same weights."""
    from streamlev.torch import LevAttention

    m = copy.deepcopy(model)
    for blk in m.blocks:
        blk.attn = LevAttention.from_multihead(blk.attn, budget=budget, keep_first=True)
    return m


def accuracy(model, X, y, batch: int = 256) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(X[s : s + batch]).argmax(1) for s in range(0, len(y), batch)])
    return float((pred == y).float().mean())


def train(model, X, y, *, epochs: int, seed: int, lr: float, batch: int):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * math.ceil(len(y) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)  # same batch order for every variant of a seed
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    Xtr, ytr, Xte, yte = load_digits_tokens(args.upsample)
    if args.train_limit:
        Xtr, ytr = Xtr[: args.train_limit], ytr[: args.train_limit]
    if args.test_limit:
        Xte, yte = Xte[: args.test_limit], yte[: args.test_limit]
    image = 8 * args.upsample
    n_tokens = (image // args.patch) ** 2 + 1
    results = {"config": vars(args) | {"tokens": n_tokens}, "runs": []}
    for seed in args.seeds:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        init = build_vit(image=image, patch=args.patch, dim=args.dim, depth=args.depth, heads=args.heads)
        row = {"seed": seed}
        full = train(copy.deepcopy(init), Xtr, ytr, epochs=args.epochs, seed=seed, lr=args.lr, batch=args.batch)
        row["softmax"] = accuracy(full, Xte, yte)
        for k in args.budgets:
            trained = train(with_levattention(init, k), Xtr, ytr, epochs=args.epochs, seed=seed, lr=args.lr,
                            batch=args.batch)
            row[f"lev{k}_trained"] = accuracy(trained, Xte, yte)
            row[f"lev{k}_swapped"] = accuracy(with_levattention(full, k), Xte, yte)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    results["summary"] = summarize(results["runs"], args.budgets)
    return results


def summarize(runs, budgets) -> dict:
    """Mean and sample std of each accuracy over seeds, and the ratio of means to softmax."""
    out = {}
    base = np.array([r["softmax"] for r in runs])
    for key in ["softmax"] + [f"lev{k}_{w}" for k in budgets for w in ("trained", "swapped")]:
        a = np.array([r[key] for r in runs])
        out[key] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
                    "min": float(a.min()), "max": float(a.max()), "ratio_to_softmax": float(a.mean() / base.mean())}
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 8], help="keys kept per head (of 65 tokens)")
    ap.add_argument("--upsample", type=int, default=2, help="8x8 digits -> (8*upsample)^2 pixels")
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-limit", type=int, default=0, help="use only this many training images (0: all)")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on only this many test images (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="do not train: summarize the runs of result files written by --json (e.g. one per seed)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.merge:  # seeds trained in separate processes
        files = [json.load(open(f)) for f in args.merge]
        runs = [r for f in files for r in f["runs"]]
        budgets = files[0]["config"]["budgets"]
        res = {"config": files[0]["config"] | {"seeds": [r["seed"] for r in runs]}, "runs": runs,
               "summary": summarize(runs, budgets)}
    else:
        res = run(args)
    s = res["summary"]
    print(f"\n{'variant':<16} {'accuracy mean ± std':>22} {'ratio to softmax':>17}")
    for key, v in s.items():
        print(f"{key:<16} {v['mean']:>13.4f} ± {v['std']:.4f} {v['ratio_to_softmax']:>17.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
