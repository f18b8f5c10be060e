"""External merge sort of CSV rows against ``sorted`` on the rows (covguard.sorted_rows)."""

import csv
import io
import random

import pytest

from covguard.sorted_rows import SortedRows


def _rows(n, seed):
    rng = random.Random(seed)
    names = ["a.png", "b,c.png", 'q"uote.png', "new\nline.png", "caf\\xe9.png", "z/\u00e9t\u00e9.png"]
    rows = []
    for i in range(n):
        name = rng.choice(names)  # repeated names: ordered by position
        error = "bad \udce9 path" if i % 5 == 0 else ""  # a lone surrogate survives the runs
        rows.append((name, i, [name, repr(rng.random()), i % 3 == 0, rng.randrange(10), error]))
    rng.shuffle(rows)
    return rows


def _write(rows, **kwargs):
    out = io.StringIO(newline="")
    sink = SortedRows(out, **kwargs)
    for name, i, row in rows:
        sink.add(name, i, row)
    sink.close()
    return out.getvalue()


@pytest.mark.parametrize("run_rows", [1, 3, 7, 1000])
def test_rows_come_out_sorted_whatever_the_run_size(run_rows, tmp_path):
    rows = _rows(50, seed=run_rows)
    reference = io.StringIO(newline="")
    csv.writer(reference).writerows(row for _, _, row in sorted(rows, key=lambda r: r[:2]))
    assert _write(rows, in_order=False, run_rows=run_rows, spill_dir=tmp_path) == reference.getvalue()
    assert list(tmp_path.iterdir()) == []  # the runs have no name and are gone


def test_rows_in_order_are_written_at_once():
    out = io.StringIO(newline="")
    sink = SortedRows(out, in_order=True)
    sink.add("a.png", 0, ["a.png", 1.0])
    assert out.getvalue() == "a.png,1.0\r\n"  # before close: nothing held
    with pytest.raises(ValueError, match="run_rows must be >= 1; got 0"):
        SortedRows(out, in_order=False, run_rows=0)
