"""LiteASR compression: PCA on planted data, the rank rule, exactness at full rank, real tiny.en quality,
the config's checks, plan_only and the report."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from liteasr.compress import (MIN_CLIPS, Budget, CompressConfig, apply_plan, calibrate, compress,
                              compress_with_report, load_plan, make_plan, parse_threshold, plan_only, save_plan,
                              select_calibration)
from liteasr.compress.calibrate import Moments
from liteasr.compress.plan import choose_rank
from liteasr.model import LowRankLinear, encoder_linears


def planted(n: int, d: int, k: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows in R^d that live in a random k-dim subspace (basis (d, k)) plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))
    scales = torch.linspace(3.0, 1.0, k, dtype=torch.float64)
    x = (torch.randn(n, k, generator=g, dtype=torch.float64) * scales) @ basis.T
    return x + noise * torch.randn(n, d, generator=g, dtype=torch.float64) + 5.0, basis


def test_moments_stream_equals_batch():
    x, _ = planted(3000, 40, 8, 0.1)
    m = Moments(40)
    for chunk in x.split(700):
        m.add(chunk.float())
    ref = torch.cov(x.float().double().T, correction=0)
    print("max cov diff", (m.covariance - ref).abs().max().item())
    assert torch.allclose(m.mean, x.float().double().mean(0), atol=1e-9)
    assert torch.allclose(m.covariance, ref, atol=1e-8)  # float64 sums of float32 data: ~1e-12 relative


def test_pca_recovers_planted_subspace_and_rank():
    d, k = 96, 32
    x, basis = planted(20000, d, k, noise=1e-3)
    m = Moments(d)
    m.add(x)
    lam, vecs = torch.linalg.eigh(m.covariance)
    top = vecs[:, -k:]
    # principal angles between recovered and planted subspaces: all cosines ~ 1
    cos = torch.linalg.svdvals(top.T @ basis)
    print("min cosine", cos.min().item())
    assert cos.min() > 0.999
    # the rule picks exactly the planted rank (a multiple of 16) for any θ the signal explains
    rank, explained, _ = choose_rank(lam.flip(0), 0.999, d_in=512, d_out=d)
    assert rank == k and explained > 0.999


def test_rank_is_monotone_in_threshold_and_dense_rules():
    lam = torch.logspace(0, -4, 384, dtype=torch.float64)
    ranks = [choose_rank(lam, t, 384, 384)[0] or 384 for t in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)]
    print(ranks)
    assert ranks == sorted(ranks) and all(r % 16 == 0 for r in ranks)
    assert choose_rank(lam, 1.0, 384, 384)[0] is None  # θ = 1 keeps the layer dense
    # square layer: dense once k >= d/2 (k·2d >= d²)
    flat = torch.ones(384, dtype=torch.float64)
    assert choose_rank(flat, 0.5, 384, 384)[0] is None  # needs k = 208 > 192
    assert choose_rank(flat, 0.4, 384, 384)[0] == 160


@pytest.mark.parametrize("bad", ["1.5", "0", "-0.1", "abc", "0.9:0.9:0.9", "0.9:x"])
def test_threshold_parse_errors(bad):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(bad)


def test_threshold_presets():
    assert parse_threshold("a") == (0.999, 0.999)
    assert parse_threshold("b") == (0.99, 0.999)
    assert parse_threshold("c") == (0.99, 0.995)
    assert parse_threshold(0.95) == (0.95, 0.95)


def test_factor_full_rank_is_exact_and_low_rank_is_pca_optimal():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48).double()
    x, _ = planted(5000, 64, 16, 0.05)
    y = dense(x)
    m = Moments(48)
    m.add(y)
    full = LowRankLinear.from_pca(dense, m.mean, m.covariance, 48)
    print("full-rank max diff", (full(x) - y).abs().max().item())
    assert torch.allclose(full(x), y, atol=1e-10)
    # the rank-16 factor's error equals the discarded variance (PCA optimality)
    low = LowRankLinear.from_pca(dense, m.mean, m.covariance, 16)
    err = (low(x) - y).pow(2).sum(1).mean()
    discarded = torch.linalg.eigvalsh(m.covariance)[:-16].sum()
    print("error", err.item(), "discarded variance", discarded.item())
    assert torch.allclose(err, discarded, rtol=1e-6)


def _clips(speech_dev, n):
    return [str(r["path"]) for r in speech_dev[:: max(1, len(speech_dev) // n)][:n]]


def test_statistics_memory_does_not_grow_with_clips(tiny_en, speech_dev):
    paths = _clips(speech_dev, 16)
    small = calibrate(tiny_en, paths[:8], progress=False)
    large = calibrate(tiny_en, paths, progress=False)
    print("statistics bytes", small.nbytes, large.nbytes)
    assert small.nbytes == large.nbytes
    assert large.sites["encoder.layers.0.attn_in"].n > small.sites["encoder.layers.0.attn_in"].n


def test_theta_one_is_dense_and_full_rank_reproduces_encoder(tiny_en, speech_dev):
    calib = calibrate(tiny_en, _clips(speech_dev, 8), progress=False)
    assert make_plan(tiny_en, calib, 1.0).ranks == {}
    # forcing full rank everywhere reproduces the dense encoder up to float32 rounding
    full = copy.deepcopy(tiny_en)
    ranks = {n: m.out_features for n, m in encoder_linears(full).items()}
    apply_plan(full, calib, make_plan(full, calib, 0.9, ranks))
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = tiny_en.encoder(mel), full.encoder(mel)
    rel = ((out - ref).norm() / ref.norm()).item()
    print("full-rank relative error", rel)
    assert rel < 1e-4  # float32 products through an orthonormal basis: ~1e-6


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


def test_compress_tiny_preset_a_quality_and_roundtrip(tiny_en, speech_dev, check_clips, tmp_path):
    """Calibrate on clips disjoint from the check clips; SQNR floor and WER within a small bound of dense."""
    from liteasr import load_model, save
    from liteasr.eval import normalize
    import jiwer

    check_ids = {c["id"] for c in check_clips}
    cal = [r for r in speech_dev if r["id"] not in check_ids][::12][:24]
    model = copy.deepcopy(tiny_en)
    plan = compress(model, [str(r["path"]) for r in cal], CompressConfig(threshold="a", progress=False))
    assert plan.ranks, "preset a factors at least one tiny.en layer"
    assert all(r % 16 == 0 for r in plan.ranks.values())
    assert model.low_rank_config == plan.low_rank_config(4)

    paths = [str(c["path"]) for c in check_clips]
    from liteasr.audio import load_audio, log_mel_spectrogram, pad_or_trim
    mel = log_mel_spectrogram(np.stack([pad_or_trim(load_audio(p)) for p in paths[:4]]))
    with torch.no_grad():
        s = sqnr_db(tiny_en.encoder(mel), model.encoder(mel))
    print("encoder SQNR dB at preset a:", s)
    # θ = 0.999 keeps 99.9 % of each layer's output variance (30 dB per layer); errors add up over
    # 24 linears and Whisper's outlier channels, so the end-to-end floor is set well below that.
    assert s > 10.0

    refs = [normalize(c["text"]) for c in check_clips]
    dense_hyp = [normalize(r["text"]) for r in tiny_en.transcribe(paths, batch_size=8)]
    lite_hyp = [normalize(r["text"]) for r in model.transcribe(paths, batch_size=8)]
    w_dense, w_lite = jiwer.wer(refs, dense_hyp), jiwer.wer(refs, lite_hyp)
    print(f"check clips WER dense {w_dense:.4f} preset-a {w_lite:.4f}")
    assert w_lite <= w_dense + 0.03

    out = save(model, tmp_path / "lite", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lite-whisper" and config["low_rank_config"] == model.low_rank_config
    again = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(again.encoder(mel), model.encoder(mel))


def test_plan_roundtrip_and_apply(tiny_en, speech_dev, tmp_path):
    calib = calibrate(tiny_en, _clips(speech_dev, 8), progress=False)
    plan = make_plan(tiny_en, calib, "0.95")
    path = save_plan(plan, tmp_path / "plan.json")
    again = load_plan(path)
    assert again.ranks == plan.ranks and again.threshold == plan.threshold
    a, b = copy.deepcopy(tiny_en), copy.deepcopy(tiny_en)
    apply_plan(a, calib, plan)
    apply_plan(b, calib, make_plan(b, calib, again.threshold, again.ranks))
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # recompressing an already-factored model never grows a layer
    c = copy.deepcopy(a)
    calib_c = calibrate(c, _clips(speech_dev, 8), progress=False)
    plan_c = make_plan(c, calib_c, "0.9")
    for name, rank in plan.ranks.items():
        assert plan_c.ranks[name] <= rank


def test_calibration_is_deterministic(tiny_en, speech_dev):
    paths = _clips(speech_dev, 8)
    a = calibrate(tiny_en, paths, progress=False)
    b = calibrate(tiny_en, paths, progress=False)
    for k in a.sites:
        assert torch.equal(a.sites[k].gram, b.sites[k].gram)


def test_calibration_bad_input(tmp_path, speech_dev, shared_dir):
    manifest = shared_dir / "data/speech-dev/manifest.jsonl"
    with pytest.raises(ValueError, match=f"at least {MIN_CLIPS}"):
        select_calibration(manifest, num_clips=3)
    folder = tmp_path / "clips"
    folder.mkdir()
    for r in speech_dev[:9]:
        (folder / r["path"].name).write_bytes(r["path"].read_bytes())
    (folder / "broken.wav").write_text("not audio")
    with pytest.raises(ValueError, match="broken.wav"):
        select_calibration(folder, num_clips=20)
    paths, ids = select_calibration(manifest, num_clips=20)
    assert len(paths) == 20 and len(set(ids)) == 20


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": "0.99:abc"}, "threshold"),
    ({"frame_policy": "padding"}, "frame_policy"),
    ({"batch_size": 0}, "batch_size"),
    ({"recover_steps": -1}, "recover_steps"),
    ({"budget": 0.6}, "Budget"),
    ({"budget": Budget("size", 0.6), "plan": "any plan"}, "not both"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressConfig(**kwargs)


@pytest.mark.parametrize("kind, value, message", [
    ("params", 0.5, "not one of"), ("size", 1.5, r"\(0, 1\]"), ("flops", 0.0, r"\(0, 1\]"),
    ("latency_ms", -3.0, "positive"), ("size", float("nan"), "finite"),
])
def test_budget_errors(kind, value, message):
    with pytest.raises(ValueError, match=message):
        Budget(kind, value)


def test_compress_is_the_root_function_and_the_subpackage_stays_importable():
    import importlib

    import liteasr

    assert callable(liteasr.compress) and liteasr.compress.__module__ == "liteasr.compress"
    importlib.import_module("liteasr.compress.sweep")  # a later submodule import does not rebind the name
    assert callable(liteasr.compress)


def test_plan_only_leaves_the_model_and_matches_compress(tiny_en, speech_dev):
    paths = _clips(speech_dev, 8)
    ids = [f"clip{i}" for i in range(8)]
    config = CompressConfig(threshold="0.95", progress=False)
    plan = plan_only(tiny_en, paths, config, ids=ids)
    assert plan.ranks and not any(tiny_en.low_rank_config)  # nothing swapped in the model it planned
    report = compress_with_report(copy.deepcopy(tiny_en), paths, config, ids=ids)
    assert report.plan.ranks == plan.ranks and report.calibration == ids
    data = json.loads(json.dumps(report.to_dict("tiny.en")))  # JSON-able as compression.json
    assert data["model"] == "tiny.en" and data["frame_policy"] == "audio" and data["threshold"] == [0.95, 0.95]
    assert 0 < data["linear_fraction"] < data["encoder_fraction"] < 1
    assert data["after"]["encoder_flops"] < data["before"]["encoder_flops"] and data["peak_rss_mb"] > 0
    assert data["plan"]["layers"] == json.loads(plan.to_json())["layers"]
