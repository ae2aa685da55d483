"""Fit a judge head (method §4): StandardScaler + L2 logistic regression, C by validation ROC-AUC on a split by
prompt, 26 thresholds at validation-score quantiles with their accept fraction and important-class recall.

Validation is one held-out part of the prompts (the GSM8K rule) or, with `folds`, K-fold cross-validation by prompt
(the code rule): every prompt is scored once by the model that did not see it and the scores are pooled, which
is what a task with few important labels needs, since a single 10% part may hold none of them."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from judge.head import JudgeHead
from training.features import FeatureSet

C_GRID = tuple(sorted({10 ** (-0.5 * k) for k in range(1, 15)} | {1.0, 3.0, 10.0, 50.0, 100.0}))
QUANTILES = tuple(i / 25 for i in range(26))


@dataclass(frozen=True)
class FitConfig:
    layout: str = "DT"
    seed: int = 0
    c_grid: tuple[float, ...] = C_GRID
    max_iter: int = 1000  # lbfgs does not converge at C >= 1e-3 with sklearn's default 100
    default_recall: float = 0.9  # default τ: the largest quantile keeping this validation recall of important
    refit_all: bool = False  # implied by folds: the shipped model is fitted on every prompt
    folds: int = 0  # 0: one validation part; K >= 2: K-fold cross-validation by prompt


def split_by_prompt(num_prompts: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt indices: a seeded shuffle, the first int(0.9 N) + 1 for training, the rest for validation."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    cut = int(0.9 * num_prompts) + 1
    return np.array(sorted(order[:cut])), np.array(sorted(order[cut:]))


def held_out_folds(num_prompts: int, seed: int, folds: int) -> list[np.ndarray]:
    """The held-out prompt indices of each validation fold: the one part of `split_by_prompt`, or K interleaved
    parts of the same seeded shuffle."""
    if folds == 0:
        return [split_by_prompt(num_prompts, seed)[1]]
    if not 2 <= folds <= num_prompts:
        raise ValueError(f"folds must be 0 or in [2, {num_prompts}] (the number of prompts), not {folds}")
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    return [np.array(sorted(order[k::folds])) for k in range(folds)]


def out_of_fold(
    x: np.ndarray, y: np.ndarray, prompt: np.ndarray, held: list[np.ndarray], c: float, max_iter: int
) -> tuple[np.ndarray, float]:
    """P(important) of each held-out mismatch from the model fitted without its fold (NaN where never held out),
    and the mean training AUC of those models."""
    p = np.full(len(y), np.nan)
    train_auc = []
    for fold in held:
        va = np.isin(prompt, fold)
        scaler, model = fit_logistic(x[~va], y[~va], c, max_iter)
        p[va] = important_proba(scaler, model, x[va])
        train_auc.append(float(roc_auc_score(y[~va], important_proba(scaler, model, x[~va]))))
    return p, float(np.mean(train_auc))


def design_matrix(fs: FeatureSet, layout: str) -> np.ndarray:  # [N, D] float64
    parts = [fs.dt] if layout == "DT" else [fs.dd, fs.dt]
    return torch.cat(parts, dim=1).double().numpy()


def threshold_table(p: np.ndarray, y: np.ndarray, thresholds: np.ndarray) -> list[dict[str, float]]:
    """Per τ (accept a mismatch when p < τ): accept fraction, and recall / precision of the important class."""
    rows = []
    for tau in thresholds:
        flagged = p >= tau  # called important: not accepted
        tp = float((flagged & (y == 1)).sum())
        rows.append(
            {
                "threshold": float(tau),
                "accept_fraction": float((~flagged).mean()),
                "recall_important": tp / max(float((y == 1).sum()), 1.0),
                "precision_important": tp / max(float(flagged.sum()), 1.0),
                "accuracy": float((flagged == (y == 1)).mean()),
            }
        )
    return rows


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(x), y)
    return scaler, model


def important_proba(scaler: StandardScaler, model: LogisticRegression, x: np.ndarray) -> np.ndarray:
    return model.predict_proba(scaler.transform(x))[:, 1]


def fit_head(fs: FeatureSet, config: FitConfig, provenance: dict[str, Any]) -> tuple[JudgeHead, dict[str, Any]]:
    """The head and a report: AUC per C, the chosen C, the threshold table on validation (and training)."""
    x, y = design_matrix(fs, config.layout), fs.labels.numpy()
    prompt = fs.prompt_index.numpy()
    held = held_out_folds(len(fs.prompt_ids), config.seed, config.folds)
    va = np.isin(prompt, np.concatenate(held))
    if len(set(y[va].tolist())) < 2:
        raise ValueError("the validation prompts hold only one class; mine more prompts or use --folds")
    for k, fold in enumerate(held):
        if len(set(y[~np.isin(prompt, fold)].tolist())) < 2:
            raise ValueError(f"the training part of fold {k} holds only one class; mine more prompts")
    grid, scores = [], {}
    for c in config.c_grid:
        scores[c], train_auc = out_of_fold(x, y, prompt, held, c, config.max_iter)
        grid.append({"C": c, "val_auc": float(roc_auc_score(y[va], scores[c][va])), "train_auc": train_auc})
    best = max(grid, key=lambda g: g["val_auc"])
    p_val = scores[best["C"]][va]
    every = np.arange(len(fs.prompt_ids))
    fitted_prompts = every if config.folds or config.refit_all else np.setdiff1d(every, held[0])
    fitted = np.isin(prompt, fitted_prompts)
    scaler, model = fit_logistic(x[fitted], y[fitted], best["C"], config.max_iter)
    thresholds = np.quantile(p_val, QUANTILES)
    val_table = threshold_table(p_val, y[va], thresholds)
    train_table = threshold_table(important_proba(scaler, model, x[fitted]), y[fitted], thresholds)
    keeps = [r["threshold"] for r in val_table if r["recall_important"] >= config.default_recall]
    default = max(keeps) if keeps else 0.0
    val_prompts = np.concatenate(held)
    parts = held if config.folds else [fitted_prompts, val_prompts]
    ids = tuple(sorted(fs.prompt_ids[i] for i in part) for part in parts)
    split_hash = hashlib.sha256(repr(ids).encode()).hexdigest()
    report = {
        "layout": config.layout,
        "C": best["C"],
        "val_auc": best["val_auc"],
        "train_auc": best["train_auc"],
        "c_grid": grid,
        "counts": {
            "prompts": len(fs.prompt_ids),
            "train_prompts": len(fitted_prompts),
            "val_prompts": len(val_prompts),
            "train_mismatches": int(fitted.sum()),
            "val_mismatches": int(va.sum()),
            "train_important_share": float(y[fitted].mean()),
            "val_important_share": float(y[va].mean()),
        },
        "thresholds": [
            {"quantile": q, **v, "train": t} for q, v, t in zip(QUANTILES, val_table, train_table, strict=True)
        ],
        "default_threshold": default,
        "default_rule": f"largest quantile threshold with validation recall of important >= {config.default_recall}",
        "split": {
            "seed": config.seed,
            "rule": f"{config.folds}-fold cross-validation by prompt, pooled out-of-fold scores"
            if config.folds
            else "int(0.9 N) + 1 prompts for training, the rest for validation",
            "sha256": split_hash,
        },
        "max_iter": config.max_iter,
        "refit_all": bool(config.folds) or config.refit_all,
        "folds": config.folds,
        "sklearn": sklearn.__version__,
    }
    head = JudgeHead(
        layout=config.layout,
        mean=torch.from_numpy(scaler.mean_).double(),
        scale=torch.from_numpy(scaler.scale_).double(),
        weights=torch.from_numpy(model.coef_[0]).double(),
        bias=float(model.intercept_[0]),
        thresholds=torch.from_numpy(thresholds).double(),
        default_threshold=float(default),
        meta={"pair": fs.meta["pair"], "fit": report, "provenance": {**provenance, "mining": fs.meta["mining"]}},
    )
    return head, report
