"""Write CSV rows sorted by ``(name, position)`` in memory that does not grow with the rows.

``covguard score`` writes one row per image, sorted by name. A folder is read in name order, so
its rows go straight to the output as they are scored. A tar archive is read in storage order,
which may be any order: its rows are sorted here with an external merge sort. Up to ``run_rows``
rows are held in memory; a full buffer is sorted and written to an anonymous temporary file (a
*run*), and at the end the runs are merged (:func:`heapq.merge`) into the output. The rows must
be strings, ``bool`` or numbers (what :mod:`csv` writes as text): a merged row is written from
the text read back, which gives the same bytes.
"""

from __future__ import annotations

import csv
import heapq
import tempfile
from pathlib import Path
from typing import IO, Any

__all__ = ["RUN_ROWS", "SortedRows"]

RUN_ROWS = 50_000  # rows held in memory before a sorted run is written to disk (tens of MB at most)


class SortedRows:
    """Rows keyed by ``(name, position)``, written to ``handle`` sorted by that key.

    Parameters
    ----------
    handle : text file
        Where the rows go (opened with ``newline=""``).
    in_order : bool
        The rows will be added in key order: write each at once (nothing held).
    run_rows : int, optional
        Rows held in memory before a sorted run goes to a temporary file (default :data:`RUN_ROWS`).
    spill_dir : str or Path, optional
        Folder of the temporary run files (default: the system's); they have no name and
        disappear when closed, also when the process is killed.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> rows = SortedRows(out, in_order=False)
    >>> rows.add("b.png", 0, ["b.png", 1.5]); rows.add("a.png", 1, ["a.png", 0.5]); rows.close()
    >>> out.getvalue().splitlines()
    ['a.png,0.5', 'b.png,1.5']
    """

    def __init__(self, handle: IO[str], *, in_order: bool, run_rows: int | None = None, spill_dir: str | Path | None = None) -> None:
        run_rows = RUN_ROWS if run_rows is None else run_rows
        if run_rows < 1:
            raise ValueError(f"run_rows must be >= 1; got {run_rows}")
        self.writer = csv.writer(handle)
        self.in_order = in_order
        self.run_rows = run_rows
        self.spill_dir = spill_dir
        self.buffer: list[tuple[str, int, list[Any]]] = []
        self.runs: list[IO[str]] = []

    def add(self, name: str, position: int, row: list[Any]) -> None:
        """Add one row; its key is ``(name, position)`` (positions are unique)."""
        if self.in_order:
            self.writer.writerow(row)
            return
        self.buffer.append((name, position, row))
        if len(self.buffer) >= self.run_rows:
            self._spill()

    def close(self) -> None:
        """Write the held rows and merge the runs into the output; delete the runs."""
        try:
            if not self.runs:
                self.buffer.sort(key=lambda item: item[:2])
                self.writer.writerows(row for _, _, row in self.buffer)
            else:
                self._spill()
                for run in self.runs:
                    run.seek(0)
                readers = [csv.reader(run) for run in self.runs]  # rows: position, name, *row
                merged = heapq.merge(*readers, key=lambda r: (r[1], int(r[0])))
                self.writer.writerows(r[2:] for r in merged)
        finally:
            self.buffer.clear()
            for run in self.runs:
                run.close()
            self.runs.clear()

    def _spill(self) -> None:
        if not self.buffer:
            return
        self.buffer.sort(key=lambda item: item[:2])
        # surrogatepass: text (e.g. an error message naming a non-UTF-8 path) comes back unchanged
        run = tempfile.TemporaryFile("w+", newline="", encoding="utf-8", errors="surrogatepass", dir=self.spill_dir)
        self.runs.append(run)
        csv.writer(run).writerows([position, name, *row] for name, position, row in self.buffer)
        self.buffer.clear()
