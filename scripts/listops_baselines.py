"""How much of ListOps simple features explain: majority class, bag of tokens, the root operator (the first token).

    python scripts/listops_baselines.py data/cache/listops/raw [--train 20000]

Reads the official-format TSVs (``basic_train.tsv``, ``basic_test.tsv``; the cache of a generated set keeps them
under ``raw/``), tokenises them as the task does, and prints the test accuracy of each rule: a best label per root
operator, and a logistic regression (full-batch Adam, standardised features) on the frequency of each symbol, with
and without the root operator and the length.
"""
from __future__ import annotations

import argparse
import collections
import itertools
from pathlib import Path

import torch

from tasks.listops import read_tsv, VOCAB


def load(path: Path, limit: int) -> tuple[list[list[int]], torch.Tensor]:
    rows = [(ids, label) for _, ids, label in itertools.islice(read_tsv(path), limit)]
    return [list(ids) for ids, _ in rows], torch.tensor([label for _, label in rows])


def features(seqs: list[list[int]], root_and_length: bool) -> torch.Tensor:
    v = len(VOCAB)
    x = torch.zeros(len(seqs), 2 * v + 1 if root_and_length else v)
    for i, ids in enumerate(seqs):
        x[i, :v] = torch.bincount(torch.tensor(ids), minlength=v).float() / len(ids)
        if root_and_length:
            x[i, v + ids[0]] = 1.0
            x[i, -1] = len(ids) / 2000
    return x


def logistic(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, steps: int = 500) -> torch.Tensor:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    torch.manual_seed(0)
    model = torch.nn.Linear(xtr.shape[1], 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model(xte).argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="folder with basic_train.tsv and basic_test.tsv")
    parser.add_argument("--train", type=int, default=20000, help="train examples to fit on")
    args = parser.parse_args()
    train, ytr = load(args.raw / "basic_train.tsv", args.train)
    test, yte = load(args.raw / "basic_test.tsv", 10**9)
    print(f"{len(train)} train, {len(test)} test examples")
    print(f"majority class: {100 * torch.bincount(yte).max().item() / len(yte):.2f}%")
    by_root = collections.defaultdict(collections.Counter)
    for ids, y in zip(train, ytr.tolist()):
        by_root[ids[0]][y] += 1
    best = {root: c.most_common(1)[0][0] for root, c in by_root.items()}
    rule = torch.tensor([best.get(ids[0], 0) for ids in test])
    print(f"root operator alone, best label per operator: {100 * (rule == yte).float().mean():.2f}%")
    for name, extra in (("bag of tokens", False), ("bag of tokens + root operator + length", True)):
        pred = logistic(features(train, extra), ytr, features(test, extra))
        print(f"{name} (logistic regression): {100 * (pred == yte).float().mean():.2f}%")


if __name__ == "__main__":
    main()
