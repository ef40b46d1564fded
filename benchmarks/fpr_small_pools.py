"""Realised clean FPR of small trusted pools, and what recalibrating on the stream does to it.

Not a speed benchmark: the study behind docs/evaluation.md, "Realised FPR on small trusted pools
(stop 41)". For every (trusted fraction, seed): `depois-train fit` + `export-onnx` on digits
(skipped when OUT already holds that fit), the exported model scores every digit the fit never
saw (the untrusted train images and the test split), and the share it flags is the realised
FPR; then the same networks are recalibrated (``FittedDetector.infer_threshold``, what
`depois-train recalibrate` runs) on ``--recal`` images drawn from that stream, ``--draws`` times,
and the FPR is read on the rest. Prints one markdown table (and appends it to ``--out-md``).

    python benchmarks/fpr_small_pools.py --out runs/fpr --fractions 0.2 --seeds 0,1,2,5,6,7
    python benchmarks/fpr_small_pools.py --out runs/fpr --fractions 0.3 --seeds 0,1,2,5,6,7,8,9,10,11

About 90 s per fit on a 2-core VM; the scoring and recalibration take seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from depois_stream.filter.detector import Detector  # noqa: E402
from training.data import LabeledImages, load_dataset  # noqa: E402
from training.detector import FittedDetector, member_columns  # noqa: E402

TRAIN = [sys.executable, "-m", "training"]


def fit(out: Path, fraction: float, seed: int) -> Path:
    """The fit folder for (fraction, seed), trained and exported unless it is there already."""
    folder = out / f"tf{fraction:g}-s{seed}"
    if not (folder / "model.onnx").exists():
        args = ["--dataset", "digits", "--seed", str(seed), "--trusted-fraction", str(fraction), "--out", str(folder)]
        subprocess.run([*TRAIN, "fit", *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        subprocess.run([*TRAIN, "export-onnx", "--out", str(folder)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return folder


def unseen_stream(fraction: float, seed: int) -> LabeledImages:
    """Every digit the fit never saw: the train images outside its trusted pool (the pool is the
    first ``fraction`` of the seeded permutation, as ``training.data.trusted_split`` cuts it) and
    the test split."""
    splits = load_dataset("digits")
    order = np.random.default_rng(seed).permutation(len(splits.train))
    rest = np.sort(order[max(2, round(fraction * len(splits.train))):])
    train = splits.train.subset(rest)
    return LabeledImages(np.concatenate([train.images, splits.test.images]),
                         np.concatenate([train.labels, splits.test.labels]))


def recalibrated_fpr(det: FittedDetector, raw: np.ndarray, labels: np.ndarray, size: int, draws: int) -> list[float]:
    """FPR on the rest of the stream after recalibrating on ``size`` of its samples, per draw
    (the calibration arrays are replaced exactly as ``infer_threshold`` replaces them)."""
    out = []
    for draw in range(draws):
        perm = np.random.default_rng(draw).permutation(len(labels))
        cal, rest = perm[:size], perm[size:]
        det.calibration_raw, det.calibration_labels = raw[cal], labels[cal]
        union = det.calibrate(det.members, det.metadata.target_fpr, det.metadata.boundary.per_class is not None)
        out.append(float(np.mean(union.flagged(union.score(raw[rest], labels[rest]), labels[rest]))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the fits (reused when present)")
    ap.add_argument("--fractions", default="0.2,0.3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recal", type=int, default=600, help="stream samples to recalibrate on")
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--out-md", type=Path)
    a = ap.parse_args()
    rows = ["| trusted fraction | seed | pool | card's out-of-sample FPR | realised FPR (exported model) | "
            f"recalibrated on {a.recal}: mean [min, max] over {a.draws} draws |", "|---|---|---|---|---|---|"]
    for fraction in (float(f) for f in a.fractions.split(",")):
        for seed in (int(s) for s in a.seeds.split(",")):
            folder = fit(a.out, fraction, seed)
            stream = unseen_stream(fraction, seed)
            realised = float(Detector.load(folder / "model.onnx", device="cpu").predict(
                stream.images, stream.labels).poisoned.mean())
            card = json.loads((folder / "model.card.json").read_text())["calibration"]
            det = FittedDetector.load(folder / "detector")
            raw = det.raw_evidence(stream.images, stream.labels)[:, member_columns(det.members)]
            recal = recalibrated_fpr(det, raw, stream.labels, a.recal, a.draws)
            rows.append(f"| {fraction:g} | {seed} | {len(det.plan.pool)} | {card.get('out_of_sample_fpr', float('nan')):.2%} | "
                        f"{realised:.2%} | {np.mean(recal):.2%} [{min(recal):.2%}, {max(recal):.2%}] |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if a.out_md:
        with a.out_md.open("a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
