"""`bench step` on the CPU at tiny sizes: the JSON's structure, and its figures consistent with each other."""

import json
import math
from pathlib import Path

from vesuvius_lab.device import autocast_supported

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--patch", 16, "--steps", 2, "--warmup", 1, "--augment-batches", 2, "--shape", 40, "--volumes", 1,
        "model.features=[4,8]", "model.base_features=4", "model.max_features=8", "training.workers=1"]


def test_autocast_supported_on_cpu():
    assert autocast_supported("off", "cpu")
    assert autocast_supported("bf16", "cpu")  # torch's CPU build has bf16 autocast


def test_bench_step_json_is_consistent(cli):
    code, out, err = cli("bench", "step", "--json", "--config", CONFIGS / "demo.yaml",
                         "--config", CONFIGS / "kaggle_resenc_128.yaml", *TINY)
    assert code == 0, err
    result = json.loads(out[-1])
    assert result["device"].startswith("cpu")
    tolerance = result["tolerance"]
    assert {"bf16", "fp16", "rule"} <= tolerance.keys()
    runs = result["runs"]
    assert [Path(r["config"]).name for r in runs] == ["demo.yaml", "kaggle_resenc_128.yaml"]
    assert [r["augment_where"] for r in runs] == ["worker", "device"]  # each recipe's own settings
    for r in runs:
        assert r["patch"] == [16, 16, 16] and r["workers"] == 1 and r["parameters"] > 0
        steps, agreement = r["steps"], r["loss_agreement"]
        fp32 = steps["fp32"]
        measured = [p for p in ("fp32", "bf16", "fp16") if steps[p] != "unsupported"]
        assert measured[:2] == ["fp32", "bf16"]
        assert [p for p in ("fp32", "bf16", "fp16") if agreement[p] != "unsupported"] == measured
        for p in measured:
            s = steps[p]
            assert s["timed_steps"] == 2 and s["losses_finite"]
            assert 0 < s["compute_median_s"] <= s["median_s"]
            assert 0 <= s["data_wait_share"] < 1
            assert s["peak_memory_mb"] >= s["memory_at_start_mb"] > 50
            assert math.isclose(s["samples_per_s"], r["batch_size"] * r["accumulate"] / s["median_s"])
        for p in measured[1:]:
            s = steps[p]
            assert s["speedup_vs_fp32"] == round(fp32["median_s"] / s["median_s"], 3)
            assert s["memory_vs_fp32"] == round(s["peak_memory_mb"] / fp32["peak_memory_mb"], 3)
            a, base = agreement[p], agreement["fp32"]["loss"]
            assert a["tolerance"] == tolerance[p]
            assert math.isclose(a["relative_difference"], abs(a["loss"] - base) / abs(base))
            assert a["agrees"] == (a["relative_difference"] <= a["tolerance"])
            assert a["terms"].keys() == agreement["fp32"]["terms"].keys()
        assert set(agreement["fp32"]["terms"]) == set(r["loss_terms"])
        assert agreement["bf16"]["agrees"]  # a real check: bf16 autocast keeps the loss within 5 %
        aug = r["augmentation"]
        assert aug["worker"]["patches_per_s"] > 0 and aug["device"]["patches_per_s"] > 0
        assert aug["worker"]["device_s_per_batch"] == 0 < aug["device"]["device_s_per_batch"]
        assert aug["device_vs_worker"] == round(aug["device"]["patches_per_s"] / aug["worker"]["patches_per_s"], 3)


def test_bench_step_refuses_bad_arguments_in_one_line(cli):
    code, _, err = cli("bench", "step", "--json", "--config", CONFIGS / "demo.yaml", "--patch", 16, 16)
    assert code == 2 and err == ["error: bench step: --patch takes one edge or Z Y X"]
    code, _, err = cli("bench", "step", "--json", "--config", CONFIGS / "demo.yaml", "--precisions", "bf16,fp32")
    assert code == 2 and err == ["error: bench step: --precisions bf16,fp32: fp32 first, then any of bf16, fp16"]
