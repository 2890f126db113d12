import json
import statistics

import pytest


@pytest.mark.slow
def test_bench_scale_json(cli):
    code, out, err = cli("bench", "scale", "--json", "--volumes", "2", "--shape", 48, "--samples", 2, "--warmup", 0,
                         "--patch", 24, "--jobs", 2)
    assert code == 0, err
    result = json.loads(out[-1])
    assert set(result["by_volumes"]) == {"2"}
    two = result["by_volumes"]["2"]
    assert two["prepare_s_per_volume_1_job"] > 0 and two["prepare_s_per_volume_2_jobs"] > 0
    assert two["cache_over_tiff"] == round(two["cache_bytes"] / two["tiff_bytes"], 3) and two["cache_bytes"] > 0
    patches = result["patches"]
    assert patches["ours_patches_per_s"] > 0 and patches["memmap_patches_per_s"] > 0 and patches["volumes"] == 2
    # the ratio is of the unrounded medians, which the JSON keeps in its per-run records
    ours = statistics.median(r["patches_per_s"] for r in patches["runs"]["ours"])
    memmap = statistics.median(r["patches_per_s"] for r in patches["runs"]["memmap"])
    assert patches["ours_patches_per_s"] == round(ours, 3) and patches["memmap_patches_per_s"] == round(memmap, 3)
    assert patches["ratio"] == round(ours / memmap, 3)
    assert patches["ours_peak_rss_mb_per_worker"] > 50 and patches["npy_cache_bytes"] > two["cache_bytes"]
    assert result["predict"]["predict_s_per_volume"] > 0
    kaggle = result["kaggle_extrapolation"]
    assert kaggle["volumes"] == 786 and kaggle["prepare_min_1_job"] > 0 and kaggle["cache_gb"] > 0
