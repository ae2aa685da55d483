"""Judge heads: the fitted head reproduces scikit-learn, files round-trip and refuse another pair, and each row of
a batch is judged by its own profile's head at its own threshold."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from conftest import make_engine, run_all
from engine import Request, SamplingParams, SpecParams
from engine.model.protocol import ForwardBatch
from engine.spec.judging import HeadJudge
from judge.head import HeadBank, JudgeHead
from judge.io import HeadMismatchError, load_head, save_head
from training.features import FeatureSet
from training.train_judge import FitConfig, fit_head, held_out_folds, split_by_prompt

PAIR = {
    "target": {"hidden_size": 32},
    "draft": {"hidden_size": 32, "quantization": "none"},
    "tokenizer_sha256": "ab",
}


def synthetic_features(n: int = 600, prompts: int = 60, dim: int = 8, seed: int = 0) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    dt = torch.randn(n, dim, generator=gen) * torch.linspace(0.5, 3.0, dim) + 1.0
    dd = torch.randn(n, dim, generator=gen)
    logit = dt[:, 0] - 0.5 * dt[:, 3] + 0.3 * dd[:, 1] - 1.0
    labels = (torch.rand(n, generator=gen) < torch.sigmoid(logit)).long()
    return FeatureSet(
        dd=dd,
        dt=dt,
        labels=labels,
        prompt_index=torch.arange(n) % prompts,
        positions=torch.arange(n),
        prompt_ids=[f"q{i}" for i in range(prompts)],
        meta={"pair": PAIR, "mining": {}},
    )


def test_fitted_head_reproduces_sklearn_predict_proba() -> None:
    fs = synthetic_features()
    head, report = fit_head(fs, FitConfig(layout="DD-DT", c_grid=(0.01, 1.0)), {"command": "test"})
    train_p, val_p = split_by_prompt(len(fs.prompt_ids), 0)
    x = torch.cat([fs.dd, fs.dt], 1).double().numpy()
    tr = np.isin(fs.prompt_index.numpy(), train_p)
    scaler = StandardScaler().fit(x[tr])
    model = LogisticRegression(C=report["C"], max_iter=1000).fit(scaler.transform(x[tr]), fs.labels.numpy()[tr])
    want = model.predict_proba(scaler.transform(x))[:, 1]
    got = head.p_important(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # Served in fp32 with the scaler folded in: the same log-odds to float precision.
    bank = HeadBank([head])
    z32 = bank.log_odds(torch.from_numpy(x).float()[None], torch.zeros(1, dtype=torch.long))[0]
    torch.testing.assert_close(z32.double(), head.log_odds(torch.from_numpy(x)), atol=1e-4, rtol=1e-5)
    assert report["val_auc"] > 0.7
    assert not set(train_p) & set(val_p) and len(train_p) == int(0.9 * 60) + 1


def test_k_fold_scores_every_prompt_once_and_ships_the_model_fitted_on_all() -> None:
    fs = synthetic_features()
    y = fs.labels.clone()
    y[:] = 0
    y[[3, 17, 42]] = 1  # three important mismatches in three prompts: one 10% part cannot hold them all
    fs = FeatureSet(fs.dd, fs.dt, y, fs.prompt_index, fs.positions, fs.prompt_ids, fs.meta)
    with pytest.raises(ValueError, match="one class"):
        fit_head(fs, FitConfig(c_grid=(0.1,)), {})
    folds = held_out_folds(len(fs.prompt_ids), 0, 5)
    assert sorted(np.concatenate(folds).tolist()) == list(range(60))
    head, report = fit_head(fs, FitConfig(c_grid=(0.01, 0.1), folds=5), {})
    assert report["counts"]["val_mismatches"] == report["counts"]["train_mismatches"] == 600
    assert report["folds"] == 5 and report["refit_all"]
    x = fs.dt.double().numpy()
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=report["C"], max_iter=1000).fit(scaler.transform(x), y.numpy())
    want = model.predict_proba(scaler.transform(x))[:, 1]
    np.testing.assert_allclose(head.p_important(torch.from_numpy(x)).numpy(), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="folds must be"):
        held_out_folds(60, 0, 61)


def test_threshold_table_is_ordered_and_the_default_keeps_the_recall() -> None:
    head, report = fit_head(synthetic_features(), FitConfig(default_recall=0.9), {})
    rows = report["thresholds"]
    assert len(rows) == 26 == len(head.thresholds)
    assert all(a["threshold"] <= b["threshold"] for a, b in itertools.pairwise(rows))
    assert all(a["accept_fraction"] <= b["accept_fraction"] for a, b in itertools.pairwise(rows))
    assert rows[0]["accept_fraction"] == 0.0 and rows[-1]["accept_fraction"] > 0.95
    chosen = next(r for r in rows if r["threshold"] == report["default_threshold"])
    assert chosen["recall_important"] >= 0.9
    assert head.default_threshold == report["default_threshold"]


def test_head_files_round_trip_and_refuse_another_pair(tmp_path: Path) -> None:
    head, _ = fit_head(synthetic_features(), FitConfig(c_grid=(0.1,)), {"command": "x"})
    save_head(head, tmp_path / "math")
    loaded = load_head(tmp_path / "math", PAIR)
    x = torch.randn(5, head.dim, dtype=torch.float64)
    torch.testing.assert_close(loaded.log_odds(x), head.log_odds(x), atol=0, rtol=0)
    assert loaded.meta["fit"]["C"] == 0.1 and loaded.layout == "DT"
    other = {**PAIR, "draft": {"hidden_size": 32, "quantization": "int8-w8a8(lm_head=int8)"}}
    with pytest.raises(HeadMismatchError, match=r"draft\.quantization"):
        load_head(tmp_path / "math", other)
    blob = bytearray((tmp_path / "math" / "head.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "math" / "head.safetensors").write_bytes(bytes(blob))
    with pytest.raises(HeadMismatchError, match="damaged"):
        load_head(tmp_path / "math", PAIR)
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "nothing", PAIR)


def constant_head(bias: float, dim: int = 32) -> JudgeHead:
    """A head that scores every mismatch alike: bias -20 accepts all at τ = 0.5, +20 none."""
    z = torch.zeros(dim, dtype=torch.float64)
    return JudgeHead("DT", z, torch.ones(dim, dtype=torch.float64), z, bias, torch.linspace(0, 1, 26), 0.5)


def greedy_of(model, prompt: tuple[int, ...], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            batch = ForwardBatch.build([ids], [0], [0], torch.device("cpu"))
            ids.append(int(model.compute_logits(model(batch, None))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_each_row_uses_its_own_profile_and_threshold(target, draft) -> None:
    judge = HeadJudge({"math": constant_head(-20.0), "code": constant_head(20.0)})
    engine = make_engine(target, draft, judge=judge, bonus=False)
    prompt = (3, 14, 15, 92, 65)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    rows = {
        "math-on": SpecParams(profile="math", judge_threshold=0.5),
        "math-zero": SpecParams(profile="math", judge_threshold=0.0),
        "code-on": SpecParams(profile="code", judge_threshold=0.5),
        "lossless": SpecParams(profile="lossless", judge_threshold=0.9),
    }
    tokens, finals = run_all(engine, [Request(rid, prompt, params, spec) for rid, spec in rows.items()])
    target_text, draft_text = greedy_of(target, prompt, 24), greedy_of(draft, prompt, 24)
    assert target_text != draft_text
    assert tokens["math-on"] == draft_text and finals["math-on"].spec.num_judge_accepted > 0
    for rid in ("math-zero", "code-on", "lossless"):
        assert tokens[rid] == target_text, rid
        assert finals[rid].spec.num_judge_accepted == 0
    with pytest.raises(ValueError, match="unknown task profile 'maths'"):
        engine.add_request(Request("x", prompt, params, SpecParams(profile="maths", judge_threshold=0.3)))
    assert engine.num_free_slots == 8


def test_heads_of_different_layouts_cannot_share_a_bank() -> None:
    dt = constant_head(0.0)
    z = torch.zeros(64, dtype=torch.float64)
    dd_dt = JudgeHead("DD-DT", z, torch.ones(64, dtype=torch.float64), z, 0.0, torch.linspace(0, 1, 26), 0.5)
    with pytest.raises(ValueError, match="one layout"):
        HeadBank([dt, dd_dt])
