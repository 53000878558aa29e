"""The report's figures: each writes a PNG for ordinary input, for a single run and for runs with missing or None
values, closes its figure, and carries one legend whose labels say what the reader needs (a grid edge, the front)."""

import math

import matplotlib
import pytest

from studykit import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIB = 2**30


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions closed, so a test can read their legends after the PNG is written."""
    pyplot = figures._pyplot()
    closed = []
    close = pyplot.close
    monkeypatch.setattr(pyplot, "close", lambda figure: (closed.append(figure), close(figure)))
    return closed


def assert_png(path, returned):
    assert returned == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def legend_labels(figure):
    legends = [axes.get_legend() for axes in figure.axes if axes.get_legend()] + list(figure.legends)
    assert len(legends) == 1, f"{len(legends)} legends"
    return [text.get_text() for text in legends[0].get_texts()]


def run_point(name, test_perplexity, **values):
    return {"name": name, "test_perplexity": test_perplexity, **values}


SWEEPS = {
    "full_ft": [(1e-5, 31.0), (3e-5, 25.0), (1e-4, 27.5)],
    "lora_r8": [(1e-4, 40.0), (3e-4, 30.0), (1e-3, 28.0)],
    "lora_r64": [(3e-4, 33.0), (1e-3, 29.0), (3e-3, math.nan)],
}
CHOSEN = {"full_ft": 3e-5, "lora_r8": 1e-3, "lora_r64": 1e-3}

RUNS = [
    run_point(
        "full_ft",
        25.1,
        test_perplexity_std=0.3,
        forgetting=0.12,
        forgetting_std=0.01,
        peak_memory_bytes=12 * GIB,
        wall_time_seconds=5400,
        train_flops=3e17,
    ),
    run_point(
        "lora_r8",
        26.0,
        test_perplexity_std=0.5,
        forgetting=0.02,
        forgetting_std=0.004,
        peak_memory_bytes=6 * GIB,
        wall_time_seconds=3600,
        train_flops=2e17,
    ),
    run_point("lora_r64", 25.5, forgetting=0.04, peak_memory_bytes=7 * GIB, wall_time_seconds=3900, train_flops=2.1e17),
    run_point("lora_slow", 27.0, forgetting=0.03, peak_memory_bytes=9 * GIB, wall_time_seconds=4000, train_flops=4e17),
]


def test_the_backend_needs_no_display():
    figures._pyplot()
    assert matplotlib.get_backend().lower() == "agg"


def test_the_learning_rate_sweep_marks_a_choice_at_the_grid_edge(tmp_path, drawn):
    path = tmp_path / "dev_perplexity_vs_lr.png"
    assert_png(path, figures.plot_dev_perplexity_vs_lr(SWEEPS, CHOSEN, path))
    labels = legend_labels(drawn[-1])
    assert "full_ft" in labels, "3e-5 is inside its grid"
    assert "lora_r8 (edge: widen the grid)" in labels
    # 1e-3 is not lora_r64's largest rate (3e-3 is, though it diverged), so its choice is inside the grid.
    assert "lora_r64 (1 of 3 rates diverged)" in labels
    assert "chosen learning rate" in labels
    assert drawn[-1].axes[0].get_xscale() == "log"
    assert not matplotlib.pyplot.get_fignums(), "the figure is closed"


def test_the_learning_rate_sweep_draws_one_rate_and_runs_without_a_choice(tmp_path, drawn):
    path = tmp_path / "one.png"
    assert_png(path, figures.plot_dev_perplexity_vs_lr({"lora": [(1e-3, 30.0)]}, {"lora": 1e-3}, path))
    assert legend_labels(drawn[-1])[0] == "lora (edge: widen the grid)", "one rate is both edges of its grid"
    unchosen = tmp_path / "unchosen.png"
    assert_png(
        unchosen, figures.plot_dev_perplexity_vs_lr({"lora": [(1e-3, None), (3e-3, 28.0)], "full": []}, {}, unchosen)
    )


def test_learning_against_forgetting_with_and_without_seed_spreads(tmp_path, drawn):
    path = tmp_path / "learn_forget.png"
    assert_png(path, figures.plot_learn_forget(RUNS, path))
    labels = legend_labels(drawn[-1])
    assert [name for name in labels if name in {run["name"] for run in RUNS}] == [run["name"] for run in RUNS]
    assert any("no forgetting" in label for label in labels)


def test_learning_against_forgetting_with_one_run_and_missing_values(tmp_path, drawn):
    one = tmp_path / "one.png"
    assert_png(one, figures.plot_learn_forget([run_point("lora", 26.0, forgetting=-0.01)], one))
    missing = tmp_path / "missing.png"
    points = [
        run_point("lora", 26.0, forgetting=0.02, forgetting_std=None, test_perplexity_std=math.nan),
        run_point("no_general_text", 25.0, forgetting=None),
        run_point("no_keys", None),
    ]
    assert_png(missing, figures.plot_learn_forget(points, missing))
    assert legend_labels(drawn[-1])[-1] == "lora", "runs with no value are named in a note, not drawn"
    assert_png(tmp_path / "none.png", figures.plot_learn_forget([], tmp_path / "none.png"))


def test_cost_against_quality_draws_three_panels_and_the_front(tmp_path, drawn):
    path = tmp_path / "cost_vs_quality.png"
    assert_png(path, figures.plot_cost_vs_quality(RUNS, path))
    figure = drawn[-1]
    assert len(figure.axes) == 3
    assert [axes.get_xlabel() for axes in figure.axes] == [
        "peak memory (GiB)",
        "training time (minutes)",
        "training FLOPs (log scale)",
    ]
    assert figure.axes[2].get_xscale() == "log"
    assert any(label.startswith("Pareto front") for label in legend_labels(figure))


def test_cost_against_quality_with_one_run_missing_values_and_long_runs(tmp_path, drawn):
    one = tmp_path / "one.png"
    assert_png(one, figures.plot_cost_vs_quality([RUNS[0]], one))
    gaps = [
        run_point("no_memory", 25.0, peak_memory_bytes=None, wall_time_seconds=9 * 3600, train_flops=1e18),
        run_point("no_flops", 26.0, peak_memory_bytes=4 * GIB, wall_time_seconds=3 * 3600),
        run_point("no_quality", None, peak_memory_bytes=3 * GIB, wall_time_seconds=None, train_flops=5e17),
    ]
    missing = tmp_path / "missing.png"
    assert_png(missing, figures.plot_cost_vs_quality(gaps, missing))
    assert drawn[-1].axes[1].get_xlabel() == "training time (hours)", "a nine-hour run is read in hours"
    nothing = tmp_path / "nothing.png"
    assert_png(nothing, figures.plot_cost_vs_quality([run_point("untimed", 25.0)], nothing))
