"""Windows of a CSV time series as a lake source (:class:`CsvWindowSource`): each window of consecutive rows is one
example, labelled by its rows' shared label; named target columns give each window a float target vector."""

from __future__ import annotations

import collections
import csv
import warnings
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

    ``target_columns`` (numeric; not features) give each window a float32 target ``target`` of shape (T,): the
    columns' mean over the window's rows (``target_reduce="mean"``) or their values at its last row (``"last"``);
    the table records it as a target array (``target_arrays``) with per-column ranges, names and statistics, for
    the ``regression`` task (or ``multilabel``, for 0/1 columns). Without them the table is the same as before.
    """

    name = "csv"

    def __init__(self, path: str | Path, window: int, stride: int | None = None, label_column: str = "label",
                 series_column: str | None = None, feature_columns: list[str] | None = None,
                 chunk_windows: int = 65536, target_columns: list[str] | str | None = None,
                 target_reduce: str = "mean"):
        if window < 1 or (stride is not None and stride < 1):
            raise LakeError(f"window and stride must be positive, got window={window}, stride={stride}")
        if isinstance(target_columns, str):
            target_columns = [c for c in target_columns.split(",") if c]
        if target_reduce not in ("mean", "last"):
            raise LakeError(f"target_reduce must be 'mean' or 'last', got {target_reduce!r}")
        self.target_columns, self.target_reduce = list(target_columns or []), target_reduce
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
                missing = [c for c in required + self.target_columns + (self.feature_columns or [])
                           if c not in columns]
                if missing:
                    raise LakeError(f"csv source {self.path} lacks column(s) {missing}; it has {columns}")
                at = columns.index(self.label_column)
                labels = {row[at] for row in reader if len(row) == len(columns) and row[at] != ""}
        except (UnicodeDecodeError, csv.Error) as e:
            raise LakeError(f"cannot read csv source {self.path}: {e}") from e
        features = self.feature_columns or [c for c in columns if c not in required + self.target_columns
                                             and c not in ("time", "timestamp")]
        overlap = sorted(set(features) & set(self.target_columns))
        if overlap:
            raise LakeError(f"csv source {self.path}: column(s) {overlap} cannot be both features and targets")
        if not features:
            raise LakeError(f"csv source {self.path} has no feature columns besides {required}")
        return columns, features, sorted(labels)

    def tasks(self) -> Iterator[SourceData]:
        columns, features, names = self._header()
        at = {c: k for k, c in enumerate(columns)}
        targets = self.target_columns
        transforms = [{"name": "window", "window": self.window, "stride": self.stride, "features": features,
                       "label_column": self.label_column, "series_column": self.series_column,
                       "label_rule": "all rows of a window share the label"}]
        if targets:  # recorded only when used: a table without targets keeps its lineage (and digest)
            transforms[0] |= {"target_columns": targets, "target_reduce": self.target_reduce}
        windows, labels, ids, rejected, window_targets = [], [], [], [], []
        emitted = False

        def chunk() -> SourceData:
            signal = (np.stack(windows) if windows else np.zeros((0, self.window, len(features)), np.float32))
            finite = signal[np.isfinite(signal)]
            value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
            arrays, ranges, extra = {"signal": signal}, {"signal": value_range}, {}
            if targets:
                target = np.asarray(window_targets, np.float32).reshape(-1, len(targets))
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (quarantined anyway)
                    lo, hi = np.nanmin(target, 0, initial=np.inf), np.nanmax(target, 0, initial=-np.inf)
                lo, hi = np.where(lo <= hi, lo, 0.0), np.where(lo <= hi, hi, 0.0)
                arrays["target"], ranges["target"] = target, (float(lo.min()), float(hi.max()))
                extra = {"column_ranges": {"target": np.stack([lo, hi], axis=1).astype(np.float64)},
                         "column_names": {"target": list(targets)}, "targets": ("target",)}
            return SourceData(arrays, np.asarray(labels, dtype=np.int64), names, ranges, self.uri, ids=list(ids),
                              rejected=list(rejected), transforms=transforms, **extra)

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
                values = np.array([_to_float(row[at[c]]) if ok else np.nan for c in features + targets],
                                  dtype=np.float32)
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
                        rows = np.stack([v for _, _, _, v, _ in buf])
                        windows.append(rows[:, :len(features)])
                        labels.append(names.index(window_labels[0]))
                        ids.append(rid)
                        if targets:
                            values = rows[:, len(features):]
                            window_targets.append(values.mean(0) if self.target_reduce == "mean" else values[-1])
                    if len(windows) + len(rejected) >= self.chunk_windows:
                        yield chunk()
                        emitted = True
                        windows, labels, ids, rejected, window_targets = [], [], [], [], []
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
