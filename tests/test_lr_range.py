"""The LR range test on the tiny dataset's real step: a suggestion where the loss falls, an early stop
on a diverging range, the engine restored, and Apply (CLI and notebook 03's form) writing optim.lr."""

import json
import math

import torch
import yaml

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.config import load_config
from vesuvius_lab.data import open_data
from vesuvius_lab.lab.planning import PlanForm
from vesuvius_lab.loader import build_loader
from vesuvius_lab.lr_range import SKIP_BEGIN, run_range_test
from vesuvius_lab.training.engine import build_engine, forward_backward, optimizer_update


def tiny_engine(tiny_root, tmp_path, steps: int):
    config = load_config(write_tiny_config(tiny_root, tmp_path / "cfg", steps=steps, training={"workers": 0}))
    data = open_data(config)
    data.prepare(config, progress=False)
    dataset = data.patch_dataset(config)
    engine = build_engine(config, dataset, torch.device("cpu"))
    return engine, iter(build_loader(dataset, config, num_steps=steps))


def test_the_suggestion_is_where_the_loss_falls_and_the_engine_is_restored(tiny_root, tmp_path):
    steps = 60
    engine, batches = tiny_engine(tiny_root, tmp_path, steps)
    engine.optimizer.param_groups[0]["lr"] = 0.0  # one step at LR 0: the optimizer has state to restore
    optimizer_update(engine, forward_backward(engine, batches, 0).finite)
    weights = {k: v.clone() for k, v in engine.raw_model.state_dict().items()}
    moments = {k: v.clone() for k, v in engine.optimizer.state_dict()["state"][0].items()}
    rng = torch.get_rng_state()
    r = run_range_test(engine, batches, min_lr=1e-5, max_lr=3.0, steps=steps - 1)
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) > SKIP_BEGIN + 2
    assert r.lrs[0] == 1e-5 and all(b > a for a, b in zip(r.lrs, r.lrs[1:]))  # exponential: a constant ratio
    assert math.isclose(r.lrs[2] / r.lrs[1], r.lrs[1] / r.lrs[0])
    i = r.suggested_index
    assert i is not None and r.suggested_lr == r.lrs[i] and SKIP_BEGIN <= i < len(r.lrs) - 1
    assert r.smoothed[i + 1] < r.smoothed[i - 1], "the suggested LR is where the smoothed loss falls"
    assert min(r.smoothed[i:]) < r.smoothed[SKIP_BEGIN], "and it falls on from there"
    assert "steepest" in r.rule and "Lightning" in r.rule
    for k, v in engine.raw_model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert all(torch.equal(engine.optimizer.state_dict()["state"][0][k], v) for k, v in moments.items())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_diverging_range_stops_early(tiny_root, tmp_path):
    steps = 60
    engine, batches = tiny_engine(tiny_root, tmp_path, steps)
    r = run_range_test(engine, batches, min_lr=1e-3, max_lr=1e8, steps=steps)
    assert r.stopped_early and len(r.lrs) < steps, r.smoothed
    json.dumps(r.to_dict(), allow_nan=False)  # --json stays JSON when the loss was not finite
    finite = [s for s in r.smoothed if math.isfinite(s)]
    assert not math.isfinite(r.smoothed[-1]) or r.smoothed[-1] > 4 * min(finite[:-1])


def test_plan_lr_range_cli_json_plot_and_apply(tiny_root, tmp_path, cli):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=40, training={"workers": 0})
    out, plot = tmp_path / "lr.yaml", tmp_path / "lr.png"
    code, lines, err = cli("plan", "--config", config, "--lr-range", "--json", "--lr-range-steps", 40,
                           "--lr-min", 1e-5, "--lr-max", 3, "--plot", plot, "--apply", out)
    assert code == 0, err
    result = json.loads(lines[-1])
    assert len(result["lrs"]) == len(result["smoothed"]) and result["suggested_lr"] > 0 and result["seconds"] > 0
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == float(f"{result['suggested_lr']:.3g}")
    assert load_config(out).model == load_config(config).model  # the rest as written
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, _, err = cli("plan", "--config", config, "--lr-range", "--lr-min", 2, "--lr-max", 1)
    assert code == 2 and err == ["error: --lr-min 2 and --lr-max 1: need 0 < min < max"]


def test_notebook_03s_button_runs_it_and_apply_writes_optim_lr(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=30, training={"workers": 0})
    form = PlanForm(config, tmp_path / "planned.yaml")
    assert form.apply_button.disabled and form.lr_plot.layout.display == "none"
    form.lr_button.click()  # the defaults: 100 steps from 1e-8 to 1
    form.thread.join(timeout=300)
    assert not form.thread.is_alive() and not form.lr_button.disabled, form.lr_message.value
    r = form.lr_result
    assert r.suggested_lr and "suggested optim.lr" in form.lr_message.value and form.lr_plot.value[:4] == b"\x89PNG"
    assert form.progress.value == form.progress.max == len(r.lrs)
    form.apply_button.click()
    assert yaml.safe_load((tmp_path / "planned.yaml").read_text())["optim"]["lr"] == float(f"{r.suggested_lr:.3g}")
