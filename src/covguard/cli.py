"""Command-line interface: ``covguard demo`` (more commands join as benchmarks land)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from covguard.bench.demo import DemoConfig, render_markdown, run_demo

    config = DemoConfig(
        seed=args.seed,
        epochs=args.epochs,
        covariance=args.covariance,
        attack_eps=args.eps,
        max_test=args.max_test,
        progress=not args.no_progress,
    )
    tic = time.perf_counter()
    result = run_demo(args.out, config)
    print(render_markdown(result))
    print(f"Report written to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="covguard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn digits and benchmark the detectors")
    demo.add_argument("--out", default="reports/demo", help="report folder (default: reports/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30, help="classifier training epochs")
    demo.add_argument("--covariance", choices=("full", "diag", "lowrank"), default="full")
    demo.add_argument("--eps", type=float, default=0.1, help="L-inf attack budget in [0, 1] pixel units")
    demo.add_argument("--max-test", type=int, default=None, help="cap on test images (quick runs)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
