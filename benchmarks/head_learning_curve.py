"""Does mining more labels help? Judge-head ROC-AUC against the number of training prompts.

Cross-validation by prompt: the prompts of a features file are split into folds; for each fold and each fraction
of the remaining prompts (a seeded subset), the head (StandardScaler + L2 logistic regression) is fitted at every
C of a grid and scored on the held-out fold. Prints, per fraction, the mean and spread over folds of the validation
AUC at the C that is best on average. Run from the repository root:
`PYTHONPATH=. .venv/bin/python benchmarks/head_learning_curve.py runs/features/math.safetensors`
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from training.features import load_features
from training.train_judge import design_matrix, fit_logistic, held_out_folds, important_proba


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("features", type=Path)
    p.add_argument("--layout", choices=("DT", "DD-DT"), default="DT")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--fractions", default="0.25,0.5,0.75,1")
    p.add_argument("--c-grid", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    fs = load_features(args.features)
    x, y = design_matrix(fs, args.layout), fs.labels.numpy()
    prompt = fs.prompt_index.numpy()
    fractions = [float(f) for f in args.fractions.split(",")]
    grid = [float(c) for c in args.c_grid.split(",")]
    folds = held_out_folds(len(fs.prompt_ids), args.seed, args.folds)  # the folds of `fit --folds`
    order = list(range(len(fs.prompt_ids)))
    auc: dict[tuple[float, float], list[float]] = {}  # (fraction, C) -> AUC per fold
    sizes: dict[float, list[int]] = {}  # fraction -> training mismatches per fold
    for k, held in enumerate(folds):
        held_set = set(held.tolist())
        rest = [i for i in order if i not in held_set]
        va = np.isin(prompt, held)
        if len(set(y[va].tolist())) < 2:
            raise SystemExit(f"fold {k} holds one class only; use fewer --folds or mine more prompts")
        for f in fractions:
            subset = random.Random(args.seed + k).sample(rest, max(2, round(f * len(rest))))
            tr = np.isin(prompt, subset)
            sizes.setdefault(f, []).append(int(tr.sum()))
            for c in grid:
                scaler, model = fit_logistic(x[tr], y[tr], c, 1000)
                score = roc_auc_score(y[va], important_proba(scaler, model, x[va]))
                auc.setdefault((f, c), []).append(float(score))
    print(
        f"{args.features}: {len(fs.prompt_ids)} prompts, {len(y)} mismatches, {y.mean():.1%} important, "
        f"layout {args.layout}, {args.folds}-fold CV by prompt"
    )
    print("| training prompts | training mismatches | best C | validation AUC (mean ± sd over folds) |")
    print("|---|---|---|---|")
    for f in fractions:
        best = max(grid, key=lambda c: statistics.mean(auc[(f, c)]))
        scores = auc[(f, best)]
        n_prompts = round(f * (len(order) - len(order) // args.folds))
        print(
            f"| {n_prompts} ({f:.0%}) | {statistics.mean(sizes[f]):.0f} | {best:g} | "
            f"{statistics.mean(scores):.3f} ± {statistics.stdev(scores):.3f} |"
        )


if __name__ == "__main__":
    main()
