"""``covguard score``: score image files with a calibrated guard and write one CSV row per file.

What happens to each kind of input:

- ``--out`` is checked first: it must not be one of the inputs (``--detector``, ``--weights``,
  ``--images`` or an image file inside the ``--images`` folder), not a folder, and not an
  existing file unless ``--force``. The CSV is written to a temporary file next to it and
  renamed at the end: an aborted run leaves the previous file as it was.
- Every image that cannot be read or decoded (too large, truncated, a format or mode PIL
  cannot handle, too many pixels) gets a row with ``flagged=True``, no score and the reason;
  the run goes on.
- Images are decoded in the main process (``--workers 0``) or in ``--workers N`` processes
  (:mod:`covguard.decode_pool`), a bounded number ahead of the model, and rows are written as
  their batch is scored: memory does not grow with the number of images (only the list of names
  does). Rows are sorted by name (then reading position, for equal names in an archive): a
  folder is listed in name order and its rows are written as they come; a tar archive is read
  in storage order (one decompression pass) and, unless that order is sorted by name, its rows
  are sorted with an external merge sort (:mod:`covguard.sorted_rows`). The CSV is the same,
  byte for byte, whatever ``--workers``.
- Names that are not valid UTF-8 are written with ``\\xNN`` escapes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from pathlib import Path

__all__ = ["check_output", "run_score"]

_HEADER = ["path", "score", "flagged", "predicted_class", "error"]
_MAX_PENDING = 8  # rows held before a partial batch is scored anyway (many failures in a row), in batches


def check_output(out: Path, *, inputs: list[Path], images: Path, force: bool) -> None:
    """Refuse an ``--out`` that is an input, a folder, or an existing file without ``force``.

    Raises
    ------
    ValueError
        Naming the conflict.
    """
    from covguard.imagefiles import IMAGE_SUFFIXES

    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give the path of the CSV file to write")
    resolved = out.resolve()
    for path in inputs:
        if path.exists() and (resolved == path.resolve() or (out.exists() and out.samefile(path))):
            raise ValueError(f"--out {str(out)!r} is an input of this run ({str(path)!r}); write the CSV elsewhere")
    if images.is_dir() and resolved.is_relative_to(images.resolve()) and out.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"--out {str(out)!r} would be an image of the --images folder {str(images)!r}")
    if out.exists() and not force:
        raise ValueError(f"--out {str(out)!r} exists; pass --force to replace it (it is replaced only when the run succeeds)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the folder of --out {str(out)!r}: {err.strerror or err}") from err


def run_score(args: argparse.Namespace) -> int:
    """Run ``covguard score`` (errors propagate to the CLI's error boundary: exit status 2)."""
    import torch
    from tqdm.auto import tqdm

    from covguard.decode_pool import decode_stream
    from covguard.files import atomic_writer
    from covguard.guard import load_guard
    from covguard.imagefiles import list_images
    from covguard.models.user import load_classifier
    from covguard.features import model_dtype
    from covguard.sorted_rows import SortedRows

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0 (0: decode in the main process); got {args.workers}")
    out, images = Path(args.out), Path(args.images)
    check_output(out, inputs=[Path(args.detector), Path(args.weights), images], images=images, force=args.force)
    model = load_classifier(
        name=args.model, model_file=args.model_file, weights=args.weights, model_args=args.model_arg, device=args.device
    )
    guard = load_guard(args.detector, model, strict_model=not args.no_strict_model)
    channels, height, width = guard.detector.input_shape_
    dtype = model_dtype(model)
    listing = list_images(images)
    if listing.total == 0:
        raise ValueError(f"--images {args.images!r} holds no image files (suffixes: .png, .jpg, ...)")
    decoded = decode_stream(
        listing.items, channels=channels, size=(height, width), workers=args.workers, prefetch=4 * args.batch_size
    )
    # Rows of images read but not yet written, in reading order (a decoded image's row is None
    # until its batch is scored): at most one batch of images plus the failures between them.
    pending: list[tuple[str, int, list | None]] = []
    xs: list[torch.Tensor] = []
    failed = flagged = 0
    with atomic_writer(out, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        csv.writer(handle).writerow(_HEADER)
        rows = SortedRows(handle, in_order=listing.name_order, spill_dir=out.parent)

        def flush() -> None:
            nonlocal flagged
            if xs:
                result = guard(torch.stack(xs).to(dtype))  # (n, C, H, W)
                values = iter(zip(result.scores.tolist(), result.flagged.tolist(), result.predictions.tolist()))
                for k, (name, i, row) in enumerate(pending):
                    if row is None:
                        s, f, p = next(values)
                        pending[k] = (name, i, [name, repr(float(s)), f, p, ""])
                        flagged += f
                xs.clear()
            for name, i, row in pending:
                rows.add(name, i, row)
            pending.clear()

        with contextlib.closing(decoded):
            progress = tqdm(decoded, total=listing.total, desc="score", unit="img", disable=args.no_progress)
            for i, (name, x) in enumerate(progress):
                if isinstance(x, torch.Tensor):
                    xs.append(x)
                    pending.append((name, i, None))
                else:
                    pending.append((name, i, [name, "", True, "", str(x)]))
                    failed += 1
                if len(xs) == args.batch_size or len(pending) >= _MAX_PENDING * args.batch_size:
                    flush()
            flush()
        rows.close()
    print(
        f"scored {listing.total - failed} images ({failed} could not be decoded): {flagged} flagged "
        f"above threshold {guard.threshold_:.6g} (calibrated for TPR {guard.calibration_.tpr:.2f}); wrote {out}"
    )
    return 0
