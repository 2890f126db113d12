"""Live prediction: what keeping one volume's prediction adds to a validation, against that validation.

The baseline is one validation of one synthetic scroll chunk as training runs it (``score_records``:
sliding-window prediction with the configured U-Net, post-processing, the leaderboard score). The
measured extra is what the live prediction adds: ``live_volume.keep`` on the training loop's thread (it
hands the arrays to a background thread), and that thread's quantize-compress-write, timed apart.
The kept probability is a realistic one (the label perturbed as a model errs, then blurred), not
the untrained model's flat output, since its compressibility sets the write time and the bytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from scipy import ndimage

from vesuvius_lab.bench.metric import make_prediction


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=320, help="edge of the cubic volume (default 320, a Kaggle chunk)")
    p.add_argument("--repeats", type=int, default=3, help="validations measured (default 3)")
    p.add_argument("--patch", type=int, default=64, help="sliding-window patch edge (default 64)")
    p.add_argument("--features", default="8,16,32,64", help="U-Net features per stage (default 8,16,32,64)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)


def realistic_probability(label: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(probability float32, mask): a model's typical errors, with soft edges."""
    mask = make_prediction(label, seed)
    probability = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)
    probability += np.random.default_rng(seed).normal(0, 0.02, probability.shape).astype(np.float32)
    return np.clip(probability, 0, 1), probability > 0.5


def run(args: argparse.Namespace) -> dict:
    from vesuvius_lab.config import load_config
    from vesuvius_lab.device import default_device
    from vesuvius_lab.evaluate import VolumeResult
    from vesuvius_lab.inference import predict_volume
    from vesuvius_lab.leaderboard import volume_score
    from vesuvius_lab.model import build_model
    from vesuvius_lab.synth import make_volume, scroll_style
    from vesuvius_lab.training import live_volume
    from vesuvius_lab.training.run_dir import RunDir

    config = load_config(None, [f"data.patch_size=[{args.patch},{args.patch},{args.patch}]",
                                f"model.features=[{args.features}]", "val.live_keep=2"])
    device = torch.device(args.device) if args.device else default_device()
    model = build_model(config.model).to(device).eval()
    image, label = make_volume((args.size,) * 3, args.seed, 0, scroll_style(args.seed, 0))
    probability, mask = realistic_probability(label, args.seed)
    validation_s, loop_s, write_s, sizes = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = RunDir(tmp)
        run_dir.create()
        for i in range(args.repeats):
            t0 = time.perf_counter()
            pred = predict_volume(model, image, config, device)
            scores = volume_score(pred.mask, label).as_dict()
            validation_s.append(time.perf_counter() - t0)
            result = VolumeResult("bench", image, label, probability, mask, scores)
            loop_s.append(live_volume.keep(run_dir, config, [result], step=i + 1, epoch=i))
            live_volume.wait()  # in training, the next steps run meanwhile
            entry = live_volume.read_index(tmp)["entries"][-1]
            write_s.append(entry["write_s"])
            sizes.append(entry["bytes"])
        volume_bytes = (run_dir.live / live_volume.VOLUME).stat().st_size
    median = statistics.median
    return {
        "size": args.size, "device": str(device), "repeats": args.repeats,
        "validation_s_median": round(median(validation_s), 3),
        "loop_s_median": round(median(loop_s), 6),
        "background_write_s_median": round(median(write_s), 3),
        "loop_over_validation": round(median(loop_s) / median(validation_s), 7),
        "background_over_validation": round(median(write_s) / median(validation_s), 4),
        "entry_mib": round(median(sizes) / 2**20, 2), "volume_mib": round(volume_bytes / 2**20, 2),
        "raw_float32_mib": round(probability.nbytes / 2**20, 1),
    }
