"""Each loss term against a hand-computed case; ignore masking, empty patches, weight 0, fp32."""

import math

import pytest
import torch

from vesuvius_lab.bench.losses import _saved_mb, pooled_dilate, pooled_erode
from vesuvius_lab.config import LossConfig
from vesuvius_lab.losses import TERMS, TopologyLoss, _soft_dilate, _soft_erode, cl_dice, soft_skeleton, topo_loss
from vesuvius_lab.targets import DISTANCE_CLIP


def targets(label, skeleton=None, distance=None):
    label = torch.as_tensor(label, dtype=torch.uint8)
    return {
        "label": label,
        "skeleton": (label == 1).to(torch.uint8) if skeleton is None else torch.as_tensor(skeleton, dtype=torch.uint8),
        "distance": torch.zeros(label.shape) if distance is None else torch.as_tensor(distance, dtype=torch.float32),
    }


def only(term, **settings):
    weights = {t: 0.0 for t in TERMS}
    weights[term] = 1.0
    return TopologyLoss(LossConfig(**weights, **settings))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_weighted_bce_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 50.0]).reshape(1, 1, 1, 1, 4)
    label = torch.tensor([1, 0, 1, 2]).reshape(1, 1, 1, 4)  # the last voxel is ignored
    loss, report = only("bce", pos_weight=2.0)(logits, targets(label))
    expected = (2 * -math.log(sig(0)) + -math.log(1 - sig(2)) + 2 * -math.log(sig(-1))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6) and report["bce"] == pytest.approx(expected, rel=1e-6)


def test_soft_dice_by_hand():
    logits = torch.tensor([0.0, 1.0, -1.0, 9.0]).reshape(1, 1, 1, 1, 4)
    label = torch.tensor([1, 1, 0, 2]).reshape(1, 1, 1, 4)
    loss, _ = only("dice")(logits, targets(label))
    p = [sig(0), sig(1), sig(-1)]
    expected = 1 - (2 * (p[0] + p[1]) + 1) / (sum(p) + 2 + 1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_skeleton_recall_and_surface_by_hand():
    logits = torch.tensor([0.0, 3.0, -2.0, 1.0]).reshape(1, 1, 1, 1, 4)
    label = torch.tensor([1, 1, 0, 2]).reshape(1, 1, 1, 4)
    skeleton = torch.tensor([0, 1, 0, 1]).reshape(1, 1, 1, 4)  # the ignored skeleton voxel does not count
    loss, _ = only("skeleton_recall")(logits, targets(label, skeleton))
    assert loss.item() == pytest.approx(1 - (sig(3) + 1) / (1 + 1), rel=1e-6)
    distance = torch.tensor([-1.0, -2.0, 4.0, 100.0]).reshape(1, 1, 1, 4)
    loss, _ = only("surface")(logits, targets(label, distance=distance))
    expected = (sig(0) * -1 + sig(3) * -2 + sig(-2) * 4) / DISTANCE_CLIP / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cldice_by_hand_on_a_one_voxel_sheet():
    fg = torch.zeros(1, 1, 9, 9, 9)
    fg[:, :, 4] = 1  # a plane one voxel thick is its own skeleton
    assert torch.equal(soft_skeleton(fg, 3), fg)
    valid = torch.ones_like(fg)
    assert cl_dice(fg, fg, valid, fg, 3).item() == pytest.approx(0.0, abs=1e-7)
    n = fg.sum().item()
    empty = cl_dice(torch.zeros_like(fg), fg, valid, fg, 3).item()
    assert empty == pytest.approx(1 - 2 / (n + 2), rel=1e-6)  # t_prec = 1, t_sens = 1 / (n + 1)


@pytest.mark.parametrize("shape", [(2, 1, 7, 9, 11), (1, 1, 1, 5, 4)])
def test_neighbour_kernels_equal_max_pooling_in_values_and_gradients(shape):
    """The int8-coded erosion and dilation are the classic clDice pooling kernels, borders included."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    x[0, 0, 0, :2] = 1.0  # ties, where both must pick the voxel itself or an equal neighbour
    weight = torch.randn(shape, generator=gen, dtype=torch.float64)
    for ours, pooled in ((_soft_erode, pooled_erode), (_soft_dilate, pooled_dilate)):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        (ours(a) * weight).sum().backward()
        (pooled(b) * weight).sum().backward()
        assert torch.equal(ours(x), pooled(x))
        assert a.grad.sum().item() == pytest.approx(weight.sum().item())  # each output's gradient lands once
        untied = x + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        assert torch.autograd.gradcheck(ours, (untied.requires_grad_(),))
    skel_a = soft_skeleton(x, 3)
    skel_b = soft_skeleton(x, 3, pooled_erode, pooled_dilate)
    assert torch.allclose(skel_a, skel_b)


def test_soft_skeleton_keeps_a_fraction_of_the_pooling_memory():
    """int8 codes instead of int64 pooling indices: at 32^3 the skeleton keeps under a quarter."""
    prob = torch.rand(1, 1, 32, 32, 32).requires_grad_()
    ours = _saved_mb(lambda: soft_skeleton(prob, 3).sum())
    pooled = _saved_mb(lambda: soft_skeleton(prob, 3, pooled_erode, pooled_dilate).sum())
    assert 0 < ours < pooled / 4


def test_topo_loss_counts_spurious_components():
    gt = torch.zeros(1, 1, 12, 12, 12)
    gt[:, :, 2:10, 2:10, 5:7] = 1
    gt[:, :, 5:7, 5:7, 5:7] = 0  # a hole through the sheet: one b1 feature
    valid = torch.ones_like(gt)
    assert topo_loss(gt, gt, valid, downsample=1).item() == pytest.approx(0.0, abs=1e-9)
    pred = gt.clone()
    pred[:, :, 9:11, 0:2, 0:2] = 1  # a separate blob: one extra component of persistence 1
    assert topo_loss(pred, gt, valid, downsample=1).item() == pytest.approx(1.0, abs=1e-6)
    filled = gt.clone()
    filled[:, :, 5:7, 5:7, 5:7] = 0.8  # the hole nearly closed: its loop persists only 0.2
    assert topo_loss(filled, gt, valid, downsample=1).item() == pytest.approx((1 - 0.2) ** 2, abs=1e-5)


@pytest.mark.parametrize("fill", [0, 2])
def test_every_term_is_finite_on_empty_and_fully_ignored_patches(fill):
    loss_fn = TopologyLoss(LossConfig(topo=1.0, topo_every=1, topo_downsample=2))
    logits = [torch.randn(2, 1, 8, 8, 8, requires_grad=True), torch.randn(2, 1, 4, 4, 4, requires_grad=True)]
    loss, report = loss_fn(logits, targets(torch.full((2, 8, 8, 8), fill)), step=0)
    loss.backward()
    assert math.isfinite(loss.item()) and all(math.isfinite(v) for v in report.values())
    assert all(torch.isfinite(l.grad).all() for l in logits)


def test_ignored_voxels_change_nothing():
    label = torch.randint(0, 3, (1, 8, 8, 8), dtype=torch.uint8)
    a = torch.randn(1, 1, 8, 8, 8)
    b = a.clone()
    b[0, 0][label[0] == 2] = torch.randn(int((label == 2).sum()))
    loss_fn = TopologyLoss(LossConfig(topo=1.0, topo_every=1, topo_downsample=1))
    assert loss_fn(a, targets(label))[0].item() == pytest.approx(loss_fn(b, targets(label))[0].item(), rel=1e-6)


def test_weight_zero_costs_nothing_and_topo_runs_every_k_steps():
    saved = []

    def count(loss_fn, step=1):
        logits = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            _, report = loss_fn(logits, targets(torch.randint(0, 3, (1, 16, 16, 16))), step)
        return report

    report = count(TopologyLoss(LossConfig(cldice=0.0, topo=0.0)))
    assert report["cldice"] is None and report["topo"] is None
    without = sum(saved)
    saved.clear()
    count(TopologyLoss(LossConfig(cldice=0.5, topo=0.0)))
    assert sum(saved) > without
    assert count(TopologyLoss(LossConfig(topo=1.0, topo_every=5)), step=3)["topo"] is None
    assert count(TopologyLoss(LossConfig(topo=1.0, topo_every=5)), step=10)["topo"] is not None


def test_losses_accumulate_in_fp32_under_autocast():
    logits = torch.randn(1, 1, 8, 8, 8)
    label = torch.randint(0, 3, (1, 8, 8, 8), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.nn.functional.conv3d(logits, torch.ones(1, 1, 1, 1, 1))
        assert half.dtype == torch.bfloat16
        loss, _ = TopologyLoss(LossConfig())(half, targets(label))
    assert loss.dtype == torch.float32


def test_deep_supervision_uses_downsampled_targets():
    label = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    label[:, 4:8] = 1
    full = torch.full((1, 1, 16, 16, 16), -20.0)
    full[:, :, 4:8] = 20.0
    half = torch.full((1, 1, 8, 8, 8), -20.0)
    half[:, :, 2:4] = 20.0  # right at half resolution
    wrong = -half
    loss_fn = TopologyLoss(LossConfig(cldice=0, skeleton_recall=0, surface=0))
    good, _ = loss_fn([full, half], targets(label))
    bad, report = loss_fn([full, wrong], targets(label))
    assert good.item() < 0.01 < bad.item()
    assert report["dice"] < 0.01  # logged terms are the full-resolution ones


def test_every_registered_term_has_a_function():
    from vesuvius_lab.loss_terms import REGISTRY
    from vesuvius_lab.losses import FUNCTIONS

    assert list(FUNCTIONS) == [t.name for t in REGISTRY] == list(TERMS)


# A fresh interpreter whose registry holds a seventh term before the package reads it, as if its
# record had been written into loss_terms.REGISTRY, and its function into losses.FUNCTIONS.
SEVENTH_TERM = r"""
import json, sys
from pathlib import Path

import vesuvius_lab.loss_terms as lt
from vesuvius_lab.rules import Rule

lt.REGISTRY = (*lt.REGISTRY, lt.Term("mass", 0.0, "mean foreground probability",
                                     (lt.Setting("mass_power", 2, Rule(low=1, high=4), "exponent"),)))
from vesuvius_lab import losses

losses.FUNCTIONS["mass"] = lambda h, c, step: (h.prob * h.valid).mean() ** c.mass_power

from matplotlib.figure import Figure

from vesuvius_lab.config import RULES, load_config
from vesuvius_lab.errors import ConfigError
from vesuvius_lab.lab.runs import History, plot_losses
from vesuvius_lab.training import train

cfg, run = Path(sys.argv[1]), Path(sys.argv[2])
config = load_config(cfg, ["loss.mass=0.2", "loss.mass_start=2", "loss.mass_ramp=2", "loss.mass_power=3",
                           "loss.deep_supervision_terms=[bce, mass]"])
refused = {}
for override in ("loss.mass=-1", "loss.mass_power=5", "loss.mass_ramp=-1", "loss.mas=1"):
    try:
        load_config(cfg, [override])
    except ConfigError as exc:
        refused[override] = exc.lines
train(config, run, progress=False)
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
history = History()
history.add(records)
fig = Figure()
ax = fig.add_subplot()
plot_losses(ax, history)
print(json.dumps({
    "loss": {k: v for k, v in vars(config.loss).items() if k.startswith("mass")},
    "rules": {k: RULES[k].allowed() for k in RULES if k.startswith("loss.mass")},
    "heads": RULES["loss.deep_supervision_terms"].choices,
    "refused": refused,
    "history": history.terms["mass"], "weights": history.weights["mass"],
    "lines": [line.get_label() for line in ax.lines],
}))
"""


@pytest.mark.slow
def test_a_seventh_term_is_one_record(tiny_root, tmp_path):
    """A term added to the registry gets its config keys and ranges, trains, and is logged to
    metrics.jsonl and TensorBoard and drawn by the live plot, with no other change."""
    import json
    import subprocess
    import sys

    import yaml
    from lab_runs_helpers import write_tiny_config
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    cfg = write_tiny_config(tiny_root, tmp_path / "cfg", steps=4, training={"val_every_epochs": 0})
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", SEVENTH_TERM, str(cfg), str(run)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["loss"] == {"mass": 0.2, "mass_power": 3, "mass_start": 2, "mass_ramp": 2}
    assert seen["rules"] == {"loss.mass": ">= 0", "loss.mass_power": "[1, 4]", "loss.mass_start": ">= 0",
                             "loss.mass_ramp": ">= 0"}
    assert seen["heads"][-1] == "mass"
    assert seen["refused"] == {
        "loss.mass=-1": ["override: loss.mass: -1.0 is out of range (allowed: >= 0)"],
        "loss.mass_power=5": ["override: loss.mass_power: 5 is out of range (allowed: [1, 4])"],
        "loss.mass_ramp=-1": ["override: loss.mass_ramp: -1 is out of range (allowed: >= 0)"],
        "loss.mas=1": ["override: unknown key loss.mas (did you mean loss.mass?)"],
    }
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "train"]
    assert [r["weight_mass"] for r in steps] == pytest.approx([0.0, 0.0, 0.1, 0.2])  # starts at step 2, ramps over 2
    assert [r["mass"] is None for r in steps] == [True, True, False, False]  # off until it starts
    assert seen["weights"] == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert seen["history"][2:] == pytest.approx([r["mass"] for r in steps[2:]])
    assert {"mass", "mass starts"} <= set(seen["lines"])
    written = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert (written["mass"], written["mass_power"], written["mass_start"]) == (0.2, 3, 2)
    events = EventAccumulator(str(run), size_guidance={SCALARS: 0})
    events.Reload()
    assert {"train/mass", "train/weight_mass"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/mass")] == [r["step"] for r in steps[2:]]
