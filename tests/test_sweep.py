"""`liteasr sweep` in miniature: every curve, held-out clips, the files it writes."""

from __future__ import annotations

import json
import os

from liteasr.compress import Budget, CompressConfig


def test_sweep_writes_report_with_every_curve(tiny_en, speech_dev, tmp_path):
    """Dense row, θ points per frame policy, budget and recovery curves; held-out clips disjoint from
    calibration; table, JSON and PNG written (atomically: nothing but the three files is left)."""
    from liteasr.compress.sweep import sweep
    from liteasr.eval import read_manifest

    manifest = read_manifest(speech_dev[0]["path"].parent.parent / "manifest.jsonl")
    calibration, evaluation = manifest[::25][:8], manifest[7::60][:3]
    budget = Budget("size", 0.7)
    methods = {"budget": [CompressConfig(budget=budget)],
               "budget + recovery": [CompressConfig(budget=budget, recover_steps=1)]}
    rows = sweep(tiny_en, calibration, evaluation, ["0.99"], frame_policies=("audio", "all"), out_dir=tmp_path,
                 progress=False, methods=methods)
    assert [r["curve"] for r in rows] == ["dense", "LiteASR θ, frames=audio", "LiteASR θ, frames=all",
                                          "budget", "budget + recovery"]
    assert rows[3]["label"] == "budget budget_size=0.7" and rows[4]["method"] == {"budget_size": 0.7,
                                                                                  "recover_steps": 1}
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert not set(data["calibration"]) & set(data["evaluation"])
    assert rows[0]["linear_fraction"] == 1.0 and all(r["linear_fraction"] < 1.0 for r in rows[1:])
    assert rows[3]["linear_fraction"] <= 0.7 + 1e-9  # the budget holds in the swept model too
    assert rows[4]["recovery"] is not None and rows[4]["linear_fraction"] == rows[3]["linear_fraction"]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000 and "| dense |" in (tmp_path / "sweep.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["sweep.json", "sweep.md", "sweep.png"]
