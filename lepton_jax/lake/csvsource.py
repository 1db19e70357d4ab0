"""Windows of a CSV time series as a lake source (:class:`CsvWindowSource`): each window of consecutive rows is one
example, labelled by its last row's label."""

from __future__ import annotations

import collections
import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lepton_jax.errors import LakeError
from lepton_jax.lake.sources import SourceData, concat


class CsvWindowSource:
    """A CSV of sensor readings, one row per time step, cut into fixed-length windows; streamed (bounded memory:
    one window of rows per series at a time, ``chunk_windows`` windows per chunk).

    Columns: ``label_column`` (the activity/state at that step), optionally ``series_column`` (windows never cross
    from one series into the next), and numeric ``feature_columns`` (default: all other columns except
    ``time``/``timestamp``). Each window of ``window`` rows, every ``stride`` rows, becomes one example ``signal``
    of shape (window, features) labelled with its rows' label; a window whose rows disagree on the label
    (``mixed_labels``), holds a row with missing or extra cells (``malformed_row``), or has an unparsable cell (read
    as NaN: ``non_finite``) goes to the quarantine naming its rows.
    """

    name = "csv"

    def __init__(self, path: str | Path, window: int, stride: int | None = None, label_column: str = "label",
                 series_column: str | None = None, feature_columns: list[str] | None = None,
                 chunk_windows: int = 65536):
        if window < 1 or (stride is not None and stride < 1):
            raise LakeError(f"window and stride must be positive, got window={window}, stride={stride}")
        self.path, self.window, self.stride = Path(path), int(window), int(stride or window)
        self.label_column, self.series_column, self.feature_columns = label_column, series_column, feature_columns
        self.chunk_windows = max(1, int(chunk_windows))
        self.uri = f"file://{self.path.resolve()}"

    def _header(self) -> tuple[list[str], list[str], list[str]]:
        """Columns, feature columns and the sorted label names (one streaming pass over the label column)."""
        if not self.path.is_file():
            raise LakeError(f"csv source {self.path} does not exist")
        try:
            with open(self.path, newline="") as f:
                reader = csv.reader(f)
                columns = next(reader, [])
                required = [self.label_column] + ([self.series_column] if self.series_column else [])
                missing = [c for c in required + (self.feature_columns or []) if c not in columns]
                if missing:
                    raise LakeError(f"csv source {self.path} lacks column(s) {missing}; it has {columns}")
                at = columns.index(self.label_column)
                labels = {row[at] for row in reader if len(row) == len(columns) and row[at] != ""}
        except (UnicodeDecodeError, csv.Error) as e:
            raise LakeError(f"cannot read csv source {self.path}: {e}") from e
        features = self.feature_columns or [c for c in columns if c not in required and c not in ("time", "timestamp")]
        if not features:
            raise LakeError(f"csv source {self.path} has no feature columns besides {required}")
        return columns, features, sorted(labels)

    def tasks(self) -> Iterator[SourceData]:
        columns, features, names = self._header()
        at = {c: k for k, c in enumerate(columns)}
        transforms = [{"name": "window", "window": self.window, "stride": self.stride, "features": features,
                       "label_column": self.label_column, "series_column": self.series_column,
                       "label_rule": "all rows of a window share the label"}]
        windows, labels, ids, rejected = [], [], [], []
        emitted = False

        def chunk() -> SourceData:
            signal = (np.stack(windows) if windows else np.zeros((0, self.window, len(features)), np.float32))
            finite = signal[np.isfinite(signal)]
            value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            return SourceData({"signal": signal}, np.asarray(labels, dtype=np.int64), names, {"signal": value_range},
                              self.uri, ids=list(ids), rejected=list(rejected), transforms=transforms)

        buf: collections.deque = collections.deque(maxlen=self.window)
        series, pos = None, 0
        with open(self.path, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            for line, row in enumerate(reader, start=2):  # spreadsheet numbering: the header is row 1
                ok = len(row) == len(columns) and row[at[self.label_column]] != ""
                key = row[at[self.series_column]] if self.series_column and ok else (series if not ok else "")
                if ok and key != series:
                    buf.clear()
                    series, pos = key, 0
                values = np.array([_to_float(row[at[c]]) if ok else np.nan for c in features], dtype=np.float32)
                buf.append((line, ok, row[at[self.label_column]] if ok else None, values, len(row)))
                pos += 1
                if pos >= self.window and (pos - self.window) % self.stride == 0:
                    rid = f"rows {buf[0][0]}-{buf[-1][0]}"
                    bad = [(ln, n) for ln, good, _, _, n in buf if not good]
                    window_labels = sorted({lab for _, good, lab, _, _ in buf if good})
                    if bad:
                        rejected.append({"id": rid, "reason": "malformed_row",
                                         "detail": f"{rid} of {self.path.name}: row {bad[0][0]} has {bad[0][1]} "
                                                   f"cell(s), the header {len(columns)} (or an empty label)"})
                    elif len(window_labels) > 1:
                        rejected.append({"id": rid, "reason": "mixed_labels",
                                         "detail": f"{rid} of {self.path.name} span labels {window_labels}"})
                    else:
                        windows.append(np.stack([v for _, _, _, v, _ in buf]))
                        labels.append(names.index(window_labels[0]))
                        ids.append(rid)
                    if len(windows) + len(rejected) >= self.chunk_windows:
                        yield chunk()
                        emitted = True
                        windows, labels, ids, rejected = [], [], [], []
        if windows or rejected or not emitted:
            if not windows and not emitted and not rejected:
                raise LakeError(f"csv source {self.path} yields no windows of {self.window} rows")
            yield chunk()

    def load(self) -> SourceData:
        return concat(list(self.tasks()))


def _to_float(cell: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")
