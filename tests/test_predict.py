"""``vesuvius-lab predict`` on a folder of TIFFs: entries that are not volumes named as skipped, every
input checked before the first prediction, masks kept across reruns by their record, a killed run
resumed into a complete submission.zip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from vesuvius_lab.cli import main as cli_main
from vesuvius_lab.config import Config
from vesuvius_lab.io import write_volume
from vesuvius_lab.model import build_model

EDGE = 16  # one 16^3 window per volume: a prediction takes milliseconds


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint of a tiny untrained network, in the layout ``train`` writes."""
    config = Config()
    config.data.patch_size = [EDGE] * 3
    config.model.features = [4, 8, 16]
    config.val.overlap, config.val.batch = 0.0, 8
    torch.manual_seed(0)
    model = build_model(config.model, config.data.patch_size)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"config": config.to_dict(), "model": model.state_dict()}, path)
    return path


def volumes(folder: Path, names: list[str], edge: int = EDGE) -> list[Path]:
    rng = np.random.default_rng(len(names))
    for name in names:
        write_volume(folder / name, rng.integers(0, 256, (edge,) * 3, dtype=np.uint8))
    return [folder / n for n in names]


@pytest.fixture()
def predict(capsys):
    """``vesuvius-lab predict`` in this process: (exit status, stdout lines, stderr lines)."""

    def run(checkpoint: Path, source: Path, output: Path, *extra: str) -> tuple[int, list[str], list[str]]:
        code = cli_main(["predict", "--checkpoint", str(checkpoint), "--input", str(source), "--output", str(output),
                         *map(str, extra)])
        out, err = capsys.readouterr()
        return code, out.splitlines(), [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # less tqdm

    return run


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Each mask's inode and mtime: an atomic rewrite changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("*.tif"))}


def test_entries_that_are_not_volumes_are_named_and_hidden_ones_ignored(checkpoint, tmp_path, predict):
    src = tmp_path / "in"
    src.mkdir()
    volumes(src, ["a.tif", "b.TIFF"])
    for name in ("notes.txt", "a.png", "c.tif.bak", "d.json", "e.csv", "f.npy"):
        (src / name).write_text("x")
    (src / "sub").mkdir()
    (src / ".DS_Store").write_text("x")
    (src / "._a.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble twin")  # macOS metadata, not a TIFF
    (src / ".ipynb_checkpoints").mkdir()
    code, out, err = predict(checkpoint, src, tmp_path / "out")
    assert code == 0, err
    assert err == [f"{src}: skipped 7 files that are not .tif volumes: a.png, c.tif.bak, d.json, e.csv, f.npy, ..."]
    assert out == [f"2 masks and {tmp_path / 'out' / 'submission.zip'}"]
    assert sorted(stamps(tmp_path / "out")) == ["a.tif", "b.tif"]


BAD = {  # name sorted last, the file, the one line that refuses it
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-64]),  # headers intact, the last page's data cut
    "garbage": lambda p: p.write_bytes(b"not a tiff at all"),
    "2d": lambda p: tifffile.imwrite(p, np.zeros((EDGE, EDGE), np.uint8)),
    "uint16": lambda p: tifffile.imwrite(p, np.zeros((EDGE,) * 3, np.uint16)),
    "rgb": lambda p: tifffile.imwrite(p, np.zeros((EDGE, EDGE, EDGE, 3), np.uint8), photometric="rgb"),
}
EXPECTED = {
    "truncated": "truncated TIFF (its pages' data ends at byte {end}, the file has {size})",
    "garbage": "truncated or corrupt TIFF (TiffFileError: not a TIFF file: header=b'not ')",
    "2d": f"expected a 3D volume, found shape ({EDGE}, {EDGE})",
    "uint16": "dtype uint16, expected uint8",
    "rgb": f"3 channels per voxel (shape ({EDGE}, {EDGE}, {EDGE}, 3), axes QYXS); the model takes 1",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_a_bad_last_file_stops_predict_before_any_mask(checkpoint, tmp_path, predict, kind):
    src = tmp_path / "in"
    src.mkdir()
    *_, last = volumes(src, ["a.tif", "b.tif", "z.tif"])
    size = last.stat().st_size
    BAD[kind](last)
    code, out, err = predict(checkpoint, src, tmp_path / "out")
    assert code == 2 and out == []
    assert err == [f"error: {last}: " + EXPECTED[kind].format(end=size, size=size - 64)]
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_every_bad_file_is_reported_at_once(checkpoint, tmp_path, predict):
    src = tmp_path / "in"
    src.mkdir()
    volumes(src, ["a.tif", "a.tiff", *(f"{kind}.tif" for kind in BAD)])
    for kind, spoil in BAD.items():
        spoil(src / f"{kind}.tif")
    code, _, err = predict(checkpoint, src, tmp_path / "out")
    assert code == 2 and len(err) == 1 + len(BAD), err
    assert err[0] == f"error: {src / 'a.tiff'}: would write the same mask a.tif as {src / 'a.tif'}; rename one"
    assert sorted(line.split(":")[1].strip() for line in err[1:]) == sorted(str(src / f"{k}.tif") for k in BAD)
    code, _, err = predict(checkpoint, src, src)
    assert code == 2 and err == [f"error: {src}: is the input folder; the masks would replace its volumes, "
                                 "choose another output"]
    assert not (tmp_path / "out").exists()


def test_a_rerun_keeps_masks_made_alike_and_redoes_changed_ones(checkpoint, tmp_path, predict):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    inputs = volumes(src, ["a.tif", "b.tif", "c.tif"])
    code, _, err = predict(checkpoint, src, out)
    assert code == 0 and err == []
    first = stamps(out)
    record = json.loads((out / ".predict" / "a.json").read_text())
    assert record["identity"]["input"][0] == "a.tif" and record["checkpoints"] == [f"{checkpoint.resolve()} (auto)"]

    code, lines, err = predict(checkpoint, src, out)
    assert code == 0 and stamps(out) == first
    assert err == [f"{out}: 3 of 3 masks already made with these weights and settings, kept (--overwrite predicts them again)"]
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == ["a.tif", "b.tif", "c.tif"]

    code, _, err = predict(checkpoint, src, out, "postprocess.threshold=0.6")  # another setting: all again
    changed = stamps(out)
    assert code == 0 and err == [] and all(changed[n] != first[n] for n in first)
    code, _, err = predict(checkpoint, src, out, "postprocess.threshold=0.6")
    assert code == 0 and stamps(out) == changed and "3 of 3 masks already made" in err[0]

    os.utime(inputs[1], ns=(time.time_ns(), time.time_ns()))  # the input changed: only its mask again
    code, _, err = predict(checkpoint, src, out, "postprocess.threshold=0.6")
    again = stamps(out)
    assert code == 0 and "2 of 3 masks already made" in err[0]
    assert again["b.tif"] != changed["b.tif"] and {n: again[n] for n in ("a.tif", "c.tif")} == \
        {n: changed[n] for n in ("a.tif", "c.tif")}

    (out / "c.tif").write_bytes((out / "c.tif").read_bytes())  # a mask rewritten since its record: made again
    code, _, err = predict(checkpoint, src, out, "postprocess.threshold=0.6")
    assert code == 0 and "2 of 3 masks already made" in err[0]

    before = stamps(out)
    code, _, err = predict(checkpoint, src, out, "postprocess.threshold=0.6", "--overwrite")
    assert code == 0 and err == [] and all(stamps(out)[n] != before[n] for n in before)


@pytest.mark.slow
def test_a_run_killed_mid_folder_resumes_and_writes_the_submission(checkpoint, tmp_path, predict):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    names = [f"{i:02d}.tif" for i in range(12)]
    volumes(src, names, edge=40)  # 27 windows each: the folder takes seconds
    cmd = [sys.executable, "-m", "vesuvius_lab", "predict", "--checkpoint", str(checkpoint), "--input", str(src),
           "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and len(list(out.glob(".predict/*.json"))) < 3:
        time.sleep(0.01)
    assert proc.poll() is None, "predict finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.stem + ".tif" for p in out.glob(".predict/*.json"))
    assert 3 <= len(done) < len(names) and not (out / "submission.zip").exists()
    kept = {n: s for n, s in stamps(out).items() if n in done}

    code, lines, err = predict(checkpoint, src, out)
    assert code == 0 and err == [f"{out}: {len(done)} of {len(names)} masks already made with these weights and "
                                 "settings, kept (--overwrite predicts them again)"]
    assert {n: stamps(out)[n] for n in done} == kept
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == names
    assert not list(out.glob(".*.tmp"))  # a mask write the kill cut short left no temp file behind
