"""The report's plots stay readable with many settings: no label on another, legends off the data,
a per-task figure of sane proportions. Rows are built directly (a 12-setting sweep would take minutes)."""

from __future__ import annotations

import itertools

import pytest

from kvreuse.eval import report
from kvreuse.eval.report import ALL, Row
from kvreuse.eval.stats import Latency, wilson

TASKS = [f"task-{c}-v3" for c in "abcdefghij"]
# (name, success per 20 episodes, reuse rate, mean latency): a crowd near the baseline, two settings at
# exactly one spot (both plots), a row at 100% (the top edge) and one at 0% reuse.
SETTINGS = [
    ("baseline", 18, 0.0, 47.2),
    ("threshold(raw>=0.9)/full", 13, 0.587, 41.1),
    ("threshold(raw>=0.9)/vision_only", 13, 0.587, 41.1),
    ("threshold(raw>=0.95)/full", 15, 0.386, 43.7),
    ("threshold(raw>=0.98)/full", 18, 0.005, 47.5),
    ("crossmodal(raw>=0.9,state>=0.99)/full", 17, 0.309, 43.9),
    ("phase(raw>=0.9|0.995)/full", 17, 0.26, 47.0),
    ("threshold(raw>=0.9)/vision_only+sync", 18, 0.005, 48.1),
    ("period(2)/full", 18, 0.486, 42.2),
    ("period(3)/full", 20, 0.651, 40.3),
    ("threshold(raw>=0.9)/partial(p>=0.99)", 17, 0.52, 47.7),
    ("threshold(raw>=0.99)/full", 18, 0.01, 47.3),
]


def _row(name, task, k, n, reuse, ms):
    return Row(group="metaworld | policy p | replan 5", setting=name, task=task, is_baseline=name == "baseline",
               n=n, successes=k, errors=0, ci=wilson(k, n), lat=Latency(100, ms, ms, ms), parts={},
               reuse_rate=reuse, mixed_rate=0.0, speedup=47.2 / ms, paired=None, diff_ci=None)


def _rows():
    rows = [_row(name, ALL, 10 * k, 200, reuse, ms) for name, k, reuse, ms in SETTINGS]
    for (si, (name, k, reuse, ms)), (ti, task) in itertools.product(enumerate(SETTINGS), enumerate(TASKS)):
        rows.append(_row(name, task, max(0, min(20, k + (si * 7 + ti * 3) % 5 - 2)), 20, reuse, ms))
    return rows


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """{plot name: (figure, renderer)} as saved, laid out."""
    seen, save = {}, report._save

    def keep(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        seen[path.stem] = (fig, fig.canvas.get_renderer(), fig.get_size_inches() * fig.dpi)
        return save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    report.write_plots(_rows(), tmp_path / "plots")
    return seen


@pytest.mark.parametrize("plot", ["success_vs_reuse", "success_vs_latency"])
def test_scatter_labels_do_not_overlap_and_name_every_setting(figures, plot):
    fig, rend, _ = figures[plot]
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text()]
    boxes = [t.get_window_extent(rend) for t in labels]
    for (a, ta), (b, tb) in itertools.combinations(zip(boxes, labels, strict=True), 2):
        assert not _boxes_overlap(a, b), (ta.get_text(), tb.get_text())
    area = ax.get_window_extent(rend)
    assert all(area.x0 <= b.x0 and b.x1 <= area.x1 and area.y0 <= b.y0 and b.y1 <= area.y1 for b in boxes)
    # Every setting keeps its own number, settings at one spot included ("2,3"), and the legend keys it.
    numbers = sorted(int(n) for t in labels for n in t.get_text().split(","))
    assert numbers == list(range(1, len(SETTINGS) + 1))
    assert any(t.get_text() == "2,3" for t in labels)  # the two settings at exactly one spot
    keys = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(f"{i + 1}  {name}" in keys for i, (name, *_) in enumerate(SETTINGS))
    assert not _boxes_overlap(ax.get_legend().get_window_extent(rend), area)


def test_per_task_figure_is_readable_for_10_tasks_by_12_settings(figures):
    fig, rend, (w, h) = figures["per_task"]
    assert 0.6 <= w / h <= 3.0 and w <= 2000, (w, h)  # one row of 120 bars was 4174 x 495 px
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == len(TASKS)
    for ax in panels:
        areas = [other.get_window_extent(rend) for other in panels]
        texts = [ax.title, *ax.get_yticklabels(), *ax.get_xticklabels()]
        for t in texts:
            if t.get_text() and t.get_visible():
                b = t.get_window_extent(rend)
                assert not any(_boxes_overlap(b, a) for a in areas), t.get_text()  # off every panel's data
                assert t.get_fontsize() >= 6.5
        names = [t.get_window_extent(rend) for t in ax.get_yticklabels() if t.get_text() and t.get_visible()]
        assert all(not _boxes_overlap(a, b) for a, b in itertools.combinations(names, 2))
