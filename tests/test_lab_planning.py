"""The planner form of notebook 03 on a tiny config: Measure in its thread, recommend, Apply."""

import json
import re

import pytest
import yaml

from lab_runs_helpers import write_tiny_config
from vesuvius_lab.lab.planning import PlanForm
from vesuvius_lab.timefmt import format_duration


@pytest.mark.slow
def test_measure_recommend_apply(tiny_root, tmp_path):
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=30)
    form = PlanForm(config, tmp_path / "planned.yaml", target_epoch_minutes=0.5, coverage_target=1e9,
                    batch_sizes=[1, 2], warmup=1, steps=2, runs_dir=tmp_path / "runs")
    assert form.apply_button.disabled and form.recommend() is None
    assert form.progress.layout.visibility == "hidden" and "measuring" not in form.progress.description
    form.measure_button.click()
    assert form.measure_button.disabled
    form.thread.join(timeout=300)
    assert not form.thread.is_alive() and not form.measure_button.disabled, form.message.value
    assert form.progress.value == form.progress.max == 4  # two batch sizes, the confirmation, validation
    assert [t.batch_size for t in form.measurements.timings] == [1, 2]
    assert form.table.value.count("<tr>") == 3 and form.plot.value[:4] == b"\x89PNG"
    plan = form.plan
    plan_file = tmp_path / "runs" / config.stem / "plan.json"  # where `vesuvius-lab plan` saves it
    assert f"saved the plan to {plan_file}" in form.message.value and form.progress.description == "measured"
    restarted = PlanForm(config, tmp_path / "planned.yaml", coverage_target=1e9, runs_dir=tmp_path / "runs")  # new kernel
    assert restarted.plan.to_dict() == plan.to_dict() and restarted.target.value == 0.5
    assert "batch " in form.recommendation.value and "steps/epoch" in form.recommendation.value
    assert any(x.startswith("Too few steps") and "(< 100000000000%)" in x for x in plan.warnings)
    assert "Coverage 100000000000%" in form.recommendation.value  # the preset that reaches the target
    form.target.value = 1.0  # a new target recommends again from the same measurements
    assert form.plan is not plan and form.plan.target_epoch_s == pytest.approx(60)
    form.budget.value = 0.05  # a budget: the forecast is the trainer's, and Apply sets the trainer's key
    assert "Budget 3:00 (training.time_budget_hours=0.05)" in form.recommendation.value
    form.apply_button.click()
    training = yaml.safe_load((tmp_path / "planned.yaml").read_text())["training"]
    assert training["train_iterations_per_epoch"] == form.plan.train_iterations_per_epoch
    assert training["train_batch_size"] == form.plan.train_batch_size and training["workers"] == form.plan.workers >= 1
    assert training["time_budget_hours"] == 0.05
    assert json.loads(plan_file.read_text())["budget_hours"] == 0.05  # the plan applied is the plan saved


def test_the_form_before_measuring_and_its_words(tiny_root, tmp_path):
    """No broken image before Measure; coverage written one way (a percentage); researchers' words."""
    from vesuvius_lab.lab.planning import timings_figure
    from vesuvius_lab.planner import BatchTiming, Measurements

    config = write_tiny_config(tiny_root, tmp_path / "cfg")
    form = PlanForm(config, tmp_path / "planned.yaml", target_epoch_minutes=1.0)
    assert form.plot.layout.display == "none" and form.recommend() is None
    timing = BatchTiming(2, step_s=0.5, step_median_s=0.5, data_wait_s=0.01, compute_s=0.49, step_spread_s=0.01,
                         samples_per_s=4.0, peak_memory_mb=900.0, first_batch_s=1.0)
    form.measurements = Measurements("cpu", [timing], val_s=5.0, checkpoint_s=0.1, memory_capacity_mb=24_000.0,
                                     train_records=4, val_records=2, unique_patches=400, workers=0)
    plan = form.recommend()
    text = form.recommendation.value
    assert f"coverage {plan.coverage:.0%}" in text and f"{plan.coverage:.2f}" not in text
    # one epoch forecast, written one way wherever it shows: the summary, the explanation, the
    # forecast of the run, the recommended preset; the field is the target, and says so
    epoch = format_duration(plan.forecast_epoch_s)
    assert f"epoch ≈ {epoch} (target 1:00)" in text and f"Forecast: {epoch} per epoch" in text
    assert f"{epoch} per epoch, the final" in text and f"<td>Conservative</td><td>{plan.train_iterations_per_epoch}</td><td>{plan.max_epochs}</td><td>{epoch}</td>" in text
    assert not re.search(r"\d+\.\d min", text), text  # no second way of writing it
    assert form.target.description == "target epoch (min)"
    assert "the step time this plan uses" in text and "on average" in text  # the mean, not the median
    assert form.progress.layout.visibility == "hidden" and "measuring" not in form.progress.description
    assert "seed" not in text
    fig = timings_figure(form.measurements)
    memory = fig.axes[1]
    assert not memory.lines[1:] and "capacity 23 GiB" in memory.get_title()  # 24 GB would flatten 0.9 GB


def _measurements():
    from vesuvius_lab.planner import BatchTiming, Measurements

    timing = BatchTiming(2, step_s=0.5, step_median_s=0.5, data_wait_s=0.01, compute_s=0.49, step_spread_s=0.01,
                         samples_per_s=4.0, peak_memory_mb=900.0, first_batch_s=1.0)
    return Measurements("cpu", [timing], val_s=5.0, checkpoint_s=0.1, memory_capacity_mb=24_000.0,
                        train_records=4, val_records=2, unique_patches=400, workers=0)


def test_without_a_target_the_config_own_epoch_is_planned(tiny_root, tmp_path):
    """A demo config gets a demo-sized target: its 30 steps at 0.5 s, validation and checkpoints."""
    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=30)  # checkpoints every 10 steps
    form = PlanForm(config, tmp_path / "planned.yaml")
    assert form.target.value == 0 and form.plan is None
    form.measurements = _measurements()
    plan = form.recommend()
    epoch_s = 30 * 0.5 + 5.0 + 4 * 0.1
    assert form.target.value == pytest.approx(0.4)  # 20.4 s, up to the next tenth of a minute
    assert 30 <= plan.train_iterations_per_epoch <= 40  # the config's 30 steps, rounded up to the target
    assert epoch_s <= plan.target_epoch_s == pytest.approx(24) and plan.forecast_epoch_s <= 24
    assert plan.forecast_run_s < 3600  # minutes, not the 10 h of a 60-minute default


def test_a_saved_plan_json_is_shown_and_replanned_without_measuring(tiny_root, tmp_path):
    import json

    from vesuvius_lab.planner import recommend
    from vesuvius_lab.config import load_config

    config = write_tiny_config(tiny_root, tmp_path / "cfg", steps=30)
    saved = recommend(_measurements(), load_config(config), target_epoch_minutes=2.0)
    plan_file = tmp_path / "runs" / config.stem / "plan.json"  # where `vesuvius-lab plan` saves it
    plan_file.parent.mkdir(parents=True)
    plan_file.write_text(json.dumps(saved.to_dict(), indent=1))
    form = PlanForm(config, tmp_path / "planned.yaml", runs_dir=tmp_path / "runs")
    assert form.target.value == 2.0 and str(plan_file) in form.message.value
    assert form.plan.train_iterations_per_epoch == saved.train_iterations_per_epoch
    assert form.table.value.count("<tr>") == 2 and form.plot.value[:4] == b"\x89PNG" and not form.apply_button.disabled
    form.target.value = 1.0
    assert form.plan.train_iterations_per_epoch < saved.train_iterations_per_epoch
    plan_file.write_text('{"format": "something else"}')
    broken = PlanForm(config, tmp_path / "planned.yaml", runs_dir=tmp_path / "runs")
    assert "not a plan this form reads" in broken.message.value and broken.plan is None
