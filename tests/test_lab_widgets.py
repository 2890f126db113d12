"""The notebooks' ipywidgets forms, driven as a user would (set .value, click) without a browser."""

from pathlib import Path

import numpy as np
import pytest

from vesuvius_lab.config import AugmentConfig, SamplerConfig, TrainingConfig, load_config
from vesuvius_lab.lab import widgets
from vesuvius_lab.lab.records import LABEL_COLORS
from vesuvius_lab.lab.plots import OrthoSlices, label_rgba
from vesuvius_lab.manifest import load_manifest

PNG = b"\x89PNG"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def picker(tiny_manifest, tmp_path):
    return widgets.RecordPicker(load_manifest(tiny_manifest), cache_dir=tmp_path / "cache")


def test_label_rgba_uses_shared_colours():
    rgba = label_rgba(np.array([[0, 1], [2, 7]], np.uint8))
    np.testing.assert_allclose(rgba[0, 1], LABEL_COLORS[1])
    np.testing.assert_allclose(rgba[1, 0], LABEL_COLORS[2])
    assert rgba[0, 0, 3] == 0 and rgba[1, 1, 3] == 0


def test_ortho_slices_show_the_planes_through_a_point():
    image = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    label = (image % 3).astype(np.uint8)
    ortho = OrthoSlices(image, label)
    assert ortho.point == (2, 2, 3)
    ortho.show((1, 4, 5))
    for axis, artist in enumerate(ortho._images):
        np.testing.assert_array_equal(artist.get_array(), np.take(image, (1, 4, 5)[axis], axis=axis))
    np.testing.assert_allclose(ortho._overlays[0].get_array(), label_rgba(label[1]))
    assert [ax.get_title() for ax in ortho.axes] == ["z = 1", "y = 4", "x = 5"]
    assert ortho.png().startswith(PNG)


def test_record_picker_lists_records_and_opens_the_chosen_one(picker):
    manifest = picker.manifest
    assert [v for _, v in picker.dropdown.options] == [r.id for r in manifest.records]
    seen = []
    picker.on_change(seen.append)
    target = manifest.records[3]
    picker.dropdown.value = target.id
    assert [v.record.id for v in seen] == [target.id] and picker.volume.record.id == target.id
    assert f"<b>{target.id}</b>: scroll {target.scroll_id}" in picker.summary.value
    assert picker.info.split in picker.summary.value and "recto papyrus surface" in picker.summary.value
    assert f"{target.stats.label_histogram[1]:,}" in picker.summary.value


def test_slice_explorer_slider_moves_the_slice(picker):
    explorer = widgets.SliceExplorer(picker.volume)
    assert [s.max for s in explorer.sliders] == [47, 47, 47] and [s.value for s in explorer.sliders] == [24] * 3
    before = explorer.image.value
    explorer.sliders[0].value = 5
    assert explorer.slices.point == (5, 24, 24) and explorer.image.value != before
    np.testing.assert_array_equal(explorer.slices._images[0].get_array(), picker.volume.image[5])
    explorer.set_volume(picker.volume)
    assert explorer.slices.point == (24, 24, 24)


def test_sampler_form_maps_onto_configs():
    form = widgets.SamplerForm((32, 48, 64), SamplerConfig(fg_fraction=0.2), AugmentConfig(p_noise=0.0), 7, 3)
    assert set(form.augment_sliders) == {"p_rotation", "p_scale", "p_elastic", "p_flip", "p_gamma", "p_contrast",
                                         "p_noise", "p_blur", "p_brightness", "p_gamma_inverted", "p_lowres"}
    assert form.patch_size == (32, 48, 64) and form.sampler().fg_fraction == 0.2
    form.patch[0].value = 16
    form.sampler_sliders["fg_fraction"].value = 0.75
    form.augment_sliders["p_noise"].value = 0.5
    form.augment_enabled.value = False
    assert form.patch_size == (16, 48, 64)
    assert form.sampler() == SamplerConfig(fg_fraction=0.75)
    assert form.augment() == AugmentConfig(enabled=False, p_noise=0.5)


@pytest.mark.parametrize("config_name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                                                if not p.name.endswith("_sweep.yaml")))  # a sweep's search space
def test_every_form_widget_starts_at_the_configs_exact_value(config_name):
    """Notebook 02's form as the notebook builds it: each slider's value lies on its step's grid
    (the browser snaps it there: fg 0.33 on a 0.05 grid showed and sampled 0.35) and its readout
    prints it unrounded, so the form's configs are the config's own."""
    config = load_config(REPO / "configs" / config_name)
    form = widgets.SamplerForm(config.data.patch_size, config.sampler, config.augment)
    assert form.patch_size == tuple(config.data.patch_size)
    assert form.sampler() == config.sampler and form.augment() == config.augment
    for name, slider in {**form.sampler_sliders, **form.augment_sliders}.items():
        on_grid = slider.min + round((slider.value - slider.min) / slider.step) * slider.step
        assert on_grid == pytest.approx(slider.value, abs=1e-12), (name, slider.value, slider.step)
        assert float(format(slider.value, slider.readout_format)) == slider.value, (name, slider.readout_format)
    if config_name == "demo.yaml":
        assert form.sampler_sliders["fg_fraction"].value == 0.33
    finer = widgets.exact_slider(0.125, "p")
    assert (finer.step, finer.readout_format) == (0.001, ".3f")


def test_patch_preview_samples_on_click_and_on_record_change(picker):
    form = widgets.SamplerForm((16, 16, 16), SamplerConfig(fg_fraction=0.5), AugmentConfig(), n_patches=4)
    preview = widgets.PatchPreview(picker, form, TrainingConfig(train_batch_size=2, train_iterations_per_epoch=10), 2)
    got = []
    preview.on_sampled(got.append)
    form.n_patches.value = 6
    form.button.click()
    assert len(got) == 1 and len(preview.patches) == 6
    assert preview.status.value == f"6 patches of {picker.dropdown.value}: 3 foreground draws, 3 uniform draws"
    assert "<td>samples per epoch</td><td>20</td>" in preview.coverage.value
    assert bytes(preview.montage.value).startswith(PNG)
    other = picker.manifest.records[4].id
    picker.dropdown.value = other
    assert len(got) == 2 and {p["record_id"] for p in preview.patches} == {other}
