"""ipywidgets forms for the notebooks, built from small parts that tests drive without a browser.

Each form exposes its widgets as attributes (set ``.value``, call ``.click()``) and its result as
plain data, so a test asserts on state instead of on rendered HTML.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

import ipywidgets as w

from vesuvius_lab.cache import CachedVolume
from vesuvius_lab.config import AugmentConfig, SamplerConfig, TrainingConfig
from vesuvius_lab.lab import records
from vesuvius_lab.lab.forms import notebook_form
from vesuvius_lab.lab.plots import OrthoSlices, figure_png, montage
from vesuvius_lab.manifest import Manifest


def html_table(rows: Sequence[Sequence[str]], header: Sequence[str] = ()) -> str:
    cells = [f"<tr>{''.join(f'<th>{html.escape(h)}</th>' for h in header)}</tr>"] if header else []
    cells += [f"<tr>{''.join(f'<td>{html.escape(str(c))}</td>' for c in row)}</tr>" for row in rows]
    return f"<table>{''.join(cells)}</table>"


class RecordPicker:
    """A dropdown over the manifest's records with the chosen record's split and label histogram.

    Callbacks registered with ``on_change`` receive the newly opened volume (lazy cache arrays).
    """

    def __init__(self, manifest: Manifest, record_id: str | None = None, cache_dir: str | Path | None = None):
        self.manifest, self.cache_dir = manifest, cache_dir
        self.infos = {info.id: info for info in records.record_infos(manifest)}
        if not self.infos:
            raise ValueError(f"manifest {manifest.name!r} has no records")
        self.dropdown = w.Dropdown(
            options=[(info.title, rid) for rid, info in self.infos.items()],
            value=record_id if record_id is not None else next(iter(self.infos)),
            description="record",
            layout=w.Layout(width="420px"),
        )
        self.summary = w.HTML()
        self.widget = notebook_form([self.dropdown, self.summary])
        self._callbacks: list[Callable[[CachedVolume], None]] = []
        self.volume = self._open()
        self.dropdown.observe(self._changed, names="value")

    @property
    def info(self) -> records.RecordInfo:
        return self.infos[self.dropdown.value]

    def on_change(self, callback: Callable[[CachedVolume], None]) -> None:
        self._callbacks.append(callback)

    def _open(self) -> CachedVolume:
        volume = records.open_record(self.manifest, self.dropdown.value, self.cache_dir)
        info = self.info
        head = f"<b>{html.escape(info.id)}</b>: scroll {html.escape(info.scroll_id)}, {info.split} split, shape {volume.image.shape}"
        table = html_table(records.histogram_rows(self.manifest, info), ("label", "voxels", "share"))
        self.summary.value = f"{head}{table}"
        return volume

    def _changed(self, _change: dict) -> None:
        self.volume = self._open()
        for callback in self._callbacks:
            callback(self.volume)


class SliceExplorer:
    """Orthogonal slices of a volume with one slider per axis, rendered as a PNG image widget."""

    def __init__(self, volume: CachedVolume):
        self.sliders = [
            w.IntSlider(description=axis, min=0, max=1, continuous_update=False) for axis in "zyx"
        ]
        self.slices = OrthoSlices(volume.image, volume.label)
        self.image = w.Image(format="png")
        self.widget = notebook_form([w.HBox(self.sliders), self.image])
        self.set_volume(volume)
        for slider in self.sliders:
            slider.observe(self._moved, names="value")

    def set_volume(self, volume: CachedVolume) -> None:
        self._updating = True  # one redraw for the new volume, not one per slider reset
        for slider, size in zip(self.sliders, volume.image.shape, strict=True):
            slider.max = size - 1
            slider.value = size // 2
        self._updating = False
        self.slices.set_volume(volume.image, volume.label)
        self.image.value = self.slices.png()

    def _moved(self, _change: dict) -> None:
        if self._updating:
            return
        self.slices.show([s.value for s in self.sliders])
        self.image.value = self.slices.png()


def exact_slider(value: float, description: str, lo: float = 0.0, hi: float = 1.0) -> w.FloatSlider:
    """A slider whose grid and readout hold ``value`` exactly: the browser snaps a slider's value to
    its step, so a 0.05 step would start a config's 0.33 at 0.35. The step is 0.01, or finer when
    the value has more decimals (0.125 gets 0.001)."""
    decimals = max(2, -Decimal(repr(float(value))).normalize().as_tuple().exponent)
    return w.FloatSlider(value=value, min=lo, max=hi, step=10.0**-decimals, description=description,
                         readout_format=f".{decimals}f")


def probability_sliders(config) -> dict[str, w.FloatSlider]:
    """A 0-1 slider for every probability field (``p_*`` or ``*_fraction``) of a config dataclass,
    starting at the config's exact value."""
    return {
        f.name: exact_slider(getattr(config, f.name), f.name)
        for f in dataclasses.fields(config)
        if f.name.startswith("p_") or f.name.endswith("_fraction")
    }


class SamplerForm:
    """Patch size, sampler and augmentation probabilities, number of patches and seed as widgets."""

    def __init__(
        self,
        patch_size: Sequence[int] = (64, 64, 64),
        sampler: SamplerConfig | None = None,
        augment: AugmentConfig | None = None,
        n_patches: int = 16,
        seed: int = 0,
    ):
        self._sampler, self._augment = sampler or SamplerConfig(), augment or AugmentConfig()
        self.patch = [w.BoundedIntText(value=int(p), min=4, max=1024, description=a, layout=w.Layout(width="140px"))
                      for a, p in zip("zyx", patch_size, strict=True)]
        self.sampler_sliders = probability_sliders(self._sampler)
        self.augment_enabled = w.Checkbox(value=self._augment.enabled, description="augmentation")
        self.augment_sliders = probability_sliders(self._augment)
        self.n_patches = w.BoundedIntText(value=n_patches, min=1, max=512, description="patches")
        self.seed = w.IntText(value=seed, description="seed")
        self.button = w.Button(description="Sample", button_style="primary")
        self.widget = notebook_form(
            [
                w.HBox([w.Label("patch size"), *self.patch]),
                *self.sampler_sliders.values(),
                self.augment_enabled,
                w.GridBox(list(self.augment_sliders.values()), layout=w.Layout(grid_template_columns="repeat(2, 320px)")),
                w.HBox([self.n_patches, self.seed, self.button]),
            ]
        )

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(p.value for p in self.patch)

    def sampler(self) -> SamplerConfig:
        return dataclasses.replace(self._sampler, **{k: s.value for k, s in self.sampler_sliders.items()})

    def augment(self) -> AugmentConfig:
        values = {k: s.value for k, s in self.augment_sliders.items()}
        return dataclasses.replace(self._augment, enabled=self.augment_enabled.value, **values)


class PatchPreview:
    """Samples patches of the picked record with the form's settings; shows a montage and coverage.

    Sampling runs on the form's button and when the record changes; ``on_sampled`` callbacks get
    the new patches (the notebook draws their boxes in napari).
    """

    def __init__(
        self,
        picker: RecordPicker,
        form: SamplerForm,
        training: TrainingConfig | None = None,
        montage_samples: int = 4,
    ):
        self.picker, self.form = picker, form
        self.training = training or TrainingConfig()
        self.montage_samples = montage_samples
        self.montage = w.Image(format="png")
        self.coverage = w.HTML()
        self.status = w.HTML()
        self.patches: list[dict] = []
        self.widget = notebook_form([self.status, self.coverage, self.montage])
        self._callbacks: list[Callable[[list[dict]], None]] = []
        form.button.on_click(lambda _button: self.sample())
        picker.on_change(lambda _volume: self.sample())

    def on_sampled(self, callback: Callable[[list[dict]], None]) -> None:
        self._callbacks.append(callback)

    def sample(self) -> list[dict]:
        form = self.form
        self.patches = records.sample_patches(
            self.picker.manifest, self.picker.dropdown.value, form.patch_size, form.n_patches.value,
            form.seed.value, form.sampler(), form.augment(), self.picker.cache_dir,
        )
        n_fg = sum(p["foreground_draw"] for p in self.patches)
        self.status.value = (
            f"{len(self.patches)} patches of {self.picker.dropdown.value}: "
            f"{n_fg} foreground draws, {len(self.patches) - n_fg} uniform draws"
        )
        cov = records.epoch_coverage(self.picker.manifest, form.patch_size, self.training)
        self.coverage.value = html_table(records.coverage_rows(cov), ("training split, one epoch", ""))
        self.montage.value = figure_png(montage(self.patches, self.montage_samples))
        for callback in self._callbacks:
            callback(self.patches)
        return self.patches
