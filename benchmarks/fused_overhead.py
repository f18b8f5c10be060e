"""Scoring cost of a FusedDetector next to its most expensive member alone, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/fused_overhead.py            # ResNet-20, random weights

Members: ClassMahalanobis on layer1..layer3, KNN and MDS on avgpool, fitted on random images
(random weights and data: the cost does not depend on them). Each detector scores the same
batch ``--repeats`` times, interleaved, and the median time is kept; the ratio fused / most
expensive member is the target (<= 1.2: one forward pass shared by every member). It is a ratio
of two timings taken side by side, so machine load matters less than for absolute times.
"""

import argparse
import statistics
import sys
import time

import torch

from covguard.detectors.class_mahalanobis import ClassMahalanobis
from covguard.detectors.fused import FusedDetector
from covguard.detectors.knn import KNN
from covguard.detectors.mds import MDS
from covguard.models import cifar_resnet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=400, help="random fit images")
    parser.add_argument("--calibration", type=int, default=200, help="random held-out images")
    parser.add_argument("--batch", type=int, default=128, help="images scored per call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = cifar_resnet("resnet20").eval()
    x_fit, y_fit = torch.rand(args.fit, 3, 32, 32), torch.randint(0, 10, (args.fit,))
    x_cal, x = torch.rand(args.calibration, 3, 32, 32), torch.rand(args.batch, 3, 32, 32)
    members = {
        "class_mahalanobis": ClassMahalanobis(model, layers=["layer1", "layer2", "layer3"]),
        "knn": KNN(model, k=50),
        "mds": MDS(model),
    }
    fused = FusedDetector(members, rule="fisher")
    loader = [(x_fit[i : i + 100], y_fit[i : i + 100]) for i in range(0, args.fit, 100)]
    cal = [x_cal[i : i + 100] for i in range(0, args.calibration, 100)]
    fused.fit(loader, calibration=cal, holdout=cal, progress=False)

    timed = {**members, "fused": fused}
    times: dict[str, list[float]] = {name: [] for name in timed}
    with torch.no_grad():
        for det in timed.values():  # warm-up: kernels built and cached on first use
            det.score(x)
        for _ in range(args.repeats):
            for name, det in timed.items():
                start = time.perf_counter()
                det.score(x)
                times[name].append(time.perf_counter() - start)
            start = time.perf_counter()
            model(x)
            times.setdefault("forward only", []).append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    costliest = max(members, key=median.get)
    print(f"ResNet-20 (random weights), batch {args.batch}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    for name, t in median.items():
        print(f"  {name:18s} {1000 * t:8.1f} ms")
    print(f"fused / {costliest} = {median['fused'] / median[costliest]:.3f}  (target <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
