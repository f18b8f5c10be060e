"""``covguard score``: score image files with a calibrated guard and write one CSV row per file.

What happens to each kind of input:

- ``--out`` is checked first: it must not be one of the inputs (``--detector``, ``--weights``,
  ``--images`` or an image file inside the ``--images`` folder), not a folder, and not an
  existing file unless ``--force``. The CSV is written to a temporary file next to it and
  renamed at the end: an aborted run leaves the previous file as it was.
- Every image that cannot be read or decoded (too large, truncated, a format or mode PIL
  cannot handle, too many pixels) gets a row with ``flagged=True``, no score and the reason;
  the run goes on. Rows are sorted by name; a tar archive is read in storage order (one
  decompression pass) and its rows sorted afterwards.
- Names that are not valid UTF-8 are written with ``\\xNN`` escapes.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

__all__ = ["check_output", "run_score"]

_HEADER = ["path", "score", "flagged", "predicted_class", "error"]


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

    from covguard.decode import DecodeError
    from covguard.files import atomic_writer
    from covguard.guard import decode_image, iter_images, load_guard
    from covguard.models.user import load_classifier

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {args.batch_size}")
    out, images = Path(args.out), Path(args.images)
    check_output(out, inputs=[Path(args.detector), Path(args.weights), images], images=images, force=args.force)
    model = load_classifier(
        name=args.model, model_file=args.model_file, weights=args.weights, model_args=args.model_arg, device=args.device
    )
    guard = load_guard(args.detector, model, strict_model=not args.no_strict_model)
    channels, height, width = guard.detector.input_shape_
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    total, items = iter_images(images, order="archive")
    if total == 0:
        raise ValueError(f"--images {args.images!r} holds no image files (suffixes: .png, .jpg, ...)")
    rows: list[tuple[str, int, list]] = []  # (name, position, row): sorted by name at the end
    names: list[tuple[str, int]] = []
    xs: list[torch.Tensor] = []

    def flush() -> None:
        if names:
            result = guard(torch.stack(xs).to(dtype))  # (n, C, H, W)
            values = zip(names, result.scores.tolist(), result.flagged.tolist(), result.predictions.tolist())
            rows.extend((name, i, [name, repr(float(s)), f, p, ""]) for (name, i), s, f, p in values)
            names.clear()
            xs.clear()

    failed = 0
    for i, (name, data) in enumerate(tqdm(items, total=total, desc="score", unit="img", disable=args.no_progress)):
        try:
            xs.append(decode_image(data, channels=channels, size=(height, width)))
        except DecodeError as err:
            rows.append((name, i, [name, "", True, "", str(err)]))
            failed += 1
            continue
        names.append((name, i))
        if len(names) == args.batch_size:
            flush()
    flush()
    rows.sort(key=lambda row: row[:2])
    with atomic_writer(out, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        writer.writerow(_HEADER)
        writer.writerows(row for _, _, row in rows)
    flagged = sum(1 for _, _, row in rows if row[2] is True)
    print(
        f"scored {total - failed} images ({failed} could not be decoded): {flagged - failed} flagged "
        f"above threshold {guard.threshold_:.6g} (calibrated for TPR {guard.calibration_.tpr:.2f}); wrote {out}"
    )
    return 0
