"""Figures a reader looks at: no label overlaps another or leaves the figure, legends name runs (issue 28)."""

import importlib.util
import re

from tests.conftest import ROOT


def _text_boxes(fig):
    """Window extents of the labels the figure draws (annotations, legend entries and title, axes titles and labels;
    tick labels are matplotlib's own) after a draw with the Agg renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        legend = ax.get_legend()
        texts += [*ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label]
        texts += [*legend.get_texts(), legend.get_title()] if legend else []
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def test_accuracy_vs_bytes_labels_do_not_overlap_and_stay_inside(tmp_path, monkeypatch):
    """The edge study's figure with the rows of docs/edge.md (points that coincide or nearly do: 4/9, 5/7, 10/11)."""
    import matplotlib.figure

    spec = importlib.util.spec_from_file_location("edge_study", ROOT / "scripts" / "edge_study.py")
    edge_study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edge_study)
    rows = []
    for line in (ROOT / "docs" / "edge.md").read_text().splitlines():
        m = re.match(r"\| (.+?) \| (\d+) \| (\w+) \| ([\d.]+) \| ([\d.]+) \| [^|]+\| ([\d,]+) \|", line)
        if m:
            rows.append({"run": m[1], "H": int(m[2]), "split": m[3], "test_accuracy": float(m[5]),
                         "bytes": int(m[6].replace(",", ""))})
    assert len(rows) == 11
    figures = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), real_savefig(self, *a, **k))[1])
    edge_study._plot(rows, tmp_path / "accuracy_vs_bytes.png")
    (fig,) = figures
    boxes = _text_boxes(fig)
    labelled = " ".join(text for text, _ in boxes)
    assert all(r["run"] in labelled for r in rows)  # every run named, "data parallel" included
    width, height = fig.bbox.width, fig.bbox.height
    for i, (text, box) in enumerate(boxes):
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text
        for other, other_box in boxes[i + 1:]:
            assert not box.overlaps(other_box), (text, other)
