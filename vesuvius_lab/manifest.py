"""Dataset manifests: one YAML per dataset with its data root, split policy and records.

A manifest records each volume's shape, dtype, label histogram and a content checksum, so that
loading it later notices records that changed or vanished. The data root is relative to the
manifest's folder (or absolute, or ``${ENV}``); record paths are relative to the data root and may
not escape it. A record's image or label is a TIFF path, or a mapping into a Zarr / OME-Zarr store::

    image: {store: scroll1.zarr, array: "", level: 0, crop: "0:320,2000:2320,1800:2120"}
    label: {store: scroll1_labels.zarr, array: surface, crop: "0:320,2000:2320,1800:2120"}  # or a .tif

(``array``: the array or multiscale group inside the store, default its root; ``level``: the
OME-Zarr resolution level, default 0; ``crop``: z0:z1,y0:y1,x0:x1 at that level, default all). The file layout and the label values are the Kaggle task's own (``layout``), not
settings: a manifest that asks for others is refused rather than silently ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from vesuvius_lab.layout import IGNORE_LABEL, LABEL_NAMES, LAYOUT, Record, RecordStats, discover, inspect_record
from vesuvius_lab.errors import ConfigError, DataError
from vesuvius_lab.io import ZarrRef, atomic_write_text, format_crop, parse_crop, resolve_inside

FORMAT = "vesuvius_lab.manifest/1"
DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "data_manifests" / "synthetic_demo.yaml"


@dataclass(frozen=True)
class ManifestRecord:
    id: str
    scroll_id: str
    image: str  # relative to the data root
    label: str
    stats: RecordStats | None = None
    sizes: tuple[int, int] | None = None  # file sizes in bytes (image, label)
    image_ref: ZarrRef | None = None  # set when ``image`` is a Zarr store
    label_ref: ZarrRef | None = None


def _side(value, what: str) -> tuple[str, ZarrRef | None]:
    """A record's image or label as written in YAML: a path, or {store, array, level, crop}."""
    if isinstance(value, str):
        return value, None
    if not isinstance(value, dict) or not isinstance(value.get("store"), str):
        raise ValueError(f"{what} must be a path or a mapping with a 'store' path")
    unknown = set(value) - {"store", "array", "level", "crop"}
    if unknown:
        raise ValueError(f"{what} has unknown keys {sorted(unknown)} (allowed: store, array, level, crop)")
    level = value.get("level")
    if level is not None and (not isinstance(level, int) or level < 0):
        raise ValueError(f"{what}.level must be an integer >= 0")
    crop = parse_crop(value.get("crop"), f"{what}.crop")
    return value["store"], ZarrRef(str(value.get("array") or ""), level, crop)


def _side_dict(path: str, ref: ZarrRef | None):
    if ref is None:
        return path
    out = {"store": path, "array": ref.array}
    if ref.level is not None:
        out["level"] = ref.level
    if ref.crop is not None:
        out["crop"] = format_crop(ref.crop)
    return out


@dataclass
class Manifest:
    """A dataset description; ``root`` is absolute once loaded."""

    name: str
    root: Path
    records: list[ManifestRecord] = field(default_factory=list)
    split: dict = field(default_factory=lambda: {"policy": "by_scroll_id", "val_fraction": 0.25, "seed": 0})
    description: str = ""
    synth: dict | None = None  # generation parameters of a synthetic dataset
    source: Path | None = None  # the YAML file it was loaded from

    def resolve(self, rec: ManifestRecord) -> Record:
        """Absolute paths of a record, refusing any that escape the data root."""
        return Record(
            rec.id,
            rec.scroll_id,
            resolve_inside(self.root, rec.image, f"image path of record {rec.id}"),
            resolve_inside(self.root, rec.label, f"label path of record {rec.id}"),
            rec.image_ref,
            rec.label_ref,
        )

    def entry(self, record_id: str) -> ManifestRecord:
        """The manifest's entry for this id (paths as written, stats)."""
        for rec in self.records:
            if rec.id == record_id:
                return rec
        raise ConfigError(f"{self.source or self.name}: record {record_id!r} is not in manifest {self.name!r}")

    def record(self, record_id: str) -> Record:
        """The record with this id, its paths resolved."""
        return self.resolve(self.entry(record_id))

    def split_records(self) -> tuple[list[Record], list[Record]]:
        """(training records, validation records), split by scroll, paths resolved."""
        train_ids, val_ids = self.split_ids()
        return [self.record(i) for i in train_ids], [self.record(i) for i in val_ids]

    def split_ids(self) -> tuple[list[str], list[str]]:
        """(train ids, validation ids), split by scroll so that no validation scroll is trained on."""
        val_scrolls = set(self.val_scroll_ids())
        train = [r.id for r in self.records if r.scroll_id not in val_scrolls]
        val = [r.id for r in self.records if r.scroll_id in val_scrolls]
        return train, val

    def val_scroll_ids(self) -> list[str]:
        policy = self.split.get("policy", "by_scroll_id")
        if policy != "by_scroll_id":
            raise ConfigError(f"split.policy: unknown policy {policy!r} (supported: by_scroll_id)")
        scrolls = sorted({r.scroll_id for r in self.records})
        if "val_scroll_ids" in self.split:
            return [str(s) for s in self.split["val_scroll_ids"]]
        fraction = float(self.split.get("val_fraction", 0.25))
        if len(scrolls) < 2 or fraction <= 0:
            return []
        n_val = min(len(scrolls) - 1, max(1, round(fraction * len(scrolls))))
        rng = np.random.default_rng(int(self.split.get("seed", 0)))
        return sorted(rng.choice(scrolls, size=n_val, replace=False).tolist())

    def locate(self) -> tuple[list[Record], list[str]]:
        """Records whose files are present, and one line per record that vanished or changed size.

        File sizes are the cheap change signal; the content checksum is compared by ``preflight``.
        """
        found, problems = [], []
        for rec in self.records:
            resolved = self.resolve(rec)
            missing = [p for p, ref in ((resolved.image, rec.image_ref), (resolved.label, rec.label_ref))
                       if not (p.is_dir() if ref is not None else p.is_file())]
            if missing:
                problems.extend(f"{p}: record {rec.id} vanished (file missing)" for p in missing)
                continue
            if rec.image_ref is not None or rec.label_ref is not None:
                found.append(resolved)  # a store's change shows in its chunks: the cache and preflight compare them
                continue
            sizes = (resolved.image.stat().st_size, resolved.label.stat().st_size)
            if rec.sizes is not None and sizes != rec.sizes:
                problems.append(f"{resolved.image}: record {rec.id} changed since the manifest was built (file size)")
                continue
            found.append(resolved)
        return found, problems

    def to_dict(self, relative_to: Path | None = None) -> dict:
        root = self.root
        if relative_to is not None:
            root = Path(os.path.relpath(self.root, relative_to.resolve()))
        out = {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "root": root.as_posix(),
            "split": self.split,
        }
        if self.synth is not None:
            out["synth"] = self.synth
        out["records"] = []
        for rec in self.records:
            item = {"id": rec.id, "scroll_id": rec.scroll_id, "image": _side_dict(rec.image, rec.image_ref),
                    "label": _side_dict(rec.label, rec.label_ref)}
            if rec.stats is not None:
                item.update(
                    shape=list(rec.stats.shape),
                    dtype=rec.stats.dtype,
                    label_histogram=dict(rec.stats.label_histogram),
                    checksum=rec.stats.checksum,
                )
            if rec.sizes is not None:
                item["bytes"] = list(rec.sizes)
            out["records"].append(item)
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = yaml.safe_dump(self.to_dict(relative_to=path.parent), sort_keys=False, width=120)
        atomic_write_text(path, text)


def build_manifest(root: str | Path, name: str | None = None, progress: bool = True, template: Manifest | None = None):
    """Scan a data root, decode every record and return a Manifest; DataError lists all problems."""
    root = Path(root).resolve()
    records, problems = discover(root)
    out = []
    for record in tqdm(records, desc="manifest", unit="vol", disable=not progress):
        try:
            stats = inspect_record(record)
        except DataError as exc:
            problems.extend(exc.lines)
            continue
        out.append(
            ManifestRecord(
                record.id,
                record.scroll_id,
                record.image.relative_to(root).as_posix(),
                record.label.relative_to(root).as_posix(),
                stats,
                (record.image.stat().st_size, record.label.stat().st_size),
            )
        )
    if problems:
        raise DataError(problems)
    manifest = Manifest(name=name or root.name, root=root, records=out)
    if template is not None:
        manifest.split, manifest.description = template.split, template.description
        manifest.synth = template.synth
    return manifest


def load_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read a manifest with yaml.safe_load; ``root`` overrides the data root it names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: manifest not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a vesuvius_lab manifest (format must be {FORMAT!r})")
    problems = []
    for key in ("name", "root"):
        if not isinstance(doc.get(key), str):
            problems.append(f"{path}: key {key!r} missing or not a string")
    if problems:
        raise ConfigError(problems)
    data_root = Path(root) if root is not None else (path.parent / os.path.expandvars(doc["root"]))
    problems += _fixed_semantics(path, doc)
    records = []
    for i, item in enumerate(doc.get("records") or []):
        try:
            stats = None
            if "checksum" in item:
                stats = RecordStats(
                    shape=tuple(int(s) for s in item["shape"]),
                    dtype=str(item["dtype"]),
                    label_histogram={int(k): int(v) for k, v in item["label_histogram"].items()},
                    checksum=str(item["checksum"]),
                )
            sizes = tuple(int(b) for b in item["bytes"]) if "bytes" in item else None
            image, image_ref = _side(item["image"], "image")
            label, label_ref = _side(item["label"], "label")
            records.append(
                ManifestRecord(str(item["id"]), str(item["scroll_id"]), image, label, stats, sizes, image_ref, label_ref)
            )
        except DataError as exc:
            problems.append(f"{path}: record #{i}: {exc.lines[0]}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.append(f"{path}: record #{i} is malformed ({type(exc).__name__}: {exc})")
    if problems:
        raise ConfigError(problems)
    manifest = Manifest(
        name=doc["name"],
        root=data_root.resolve(),
        records=records,
        split=dict(doc.get("split") or {}),
        description=str(doc.get("description", "")),
        synth=doc.get("synth"),
        source=path.resolve(),
    )
    for rec in manifest.records:  # refuse escaping paths at load time, before anything reads them
        try:
            manifest.resolve(rec)
        except DataError as exc:
            problems.extend(f"{path}: {line}" for line in exc.lines)
    if problems:
        raise DataError(problems)
    return manifest


def _fixed_semantics(path: Path, doc: dict) -> list[str]:
    """Older manifests carry ``layout`` and ``labels``; accepted only where they state the Kaggle
    task's own, which is what every stage (sampler, losses, metric) applies."""
    problems = []
    layout = doc.get("layout")
    if layout and layout != LAYOUT:
        problems.append(f"{path}: key 'layout' differs from the Kaggle layout, the only one vesuvius_lab reads "
                        "(train.csv, train_images/{id}.tif, train_labels/{id}.tif); remove the key")
    labels = doc.get("labels")
    if labels:
        values = labels.get("values") if isinstance(labels, dict) else None
        ignore = labels.get("ignore_label", IGNORE_LABEL) if isinstance(labels, dict) else None
        if (values is not None and {int(k) for k in values} != set(LABEL_NAMES)) or ignore != IGNORE_LABEL:
            problems.append(f"{path}: key 'labels' asks for other label values than the Kaggle ones "
                            f"(0 background, 1 surface, {IGNORE_LABEL} ignored), which every stage applies; remove the key")
    return problems


def ensure_demo_data(manifest_path: str | Path, progress: bool = True) -> Manifest:
    """Synthesize a manifest's dataset at its root if absent, then check it matches the manifest."""
    from vesuvius_lab.synth import MARKER, synth

    manifest = load_manifest(manifest_path)
    if not manifest.synth:
        raise ConfigError(f"{manifest_path}: manifest has no 'synth' section; it describes real data")
    params = manifest.synth
    if not (manifest.root / MARKER).is_file():
        synth(
            manifest.root,
            volumes=int(params["volumes"]),
            shape=tuple(int(s) for s in params["shape"]),
            seed=int(params["seed"]),
            scrolls=int(params["scrolls"]),
            test_volumes=int(params.get("test_volumes", 0)),
            progress=progress,
            geometry=str(params.get("geometry", "planar")),
        )
    _, problems = manifest.locate()
    if problems:
        raise DataError(problems + [f"{manifest.root}: remove it and run again to regenerate the demo data"])
    return manifest
