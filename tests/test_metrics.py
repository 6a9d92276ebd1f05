import pytest

from slca_kit.metrics import AccuracyMatrix


@pytest.fixture
def matrix():
    # 3 tasks with 10, 20 and 10 test images.
    m = AccuracyMatrix()
    m.add_row([9], [10])
    m.add_row([6, 18], [10, 20])
    m.add_row([5, 10, 8], [10, 20, 10])
    return m


def test_accuracy_matrix_entries(matrix):
    assert matrix.matrix() == [[90.0, None, None], [60.0, 90.0, None], [50.0, 50.0, 80.0]]


def test_last_and_incremental_accuracy(matrix):
    # sample-weighted over seen classes: (5 + 10 + 8) / 40
    assert matrix.last_acc() == pytest.approx(57.5)
    # mean of 9/10, 24/30, 23/40
    assert matrix.inc_acc() == pytest.approx((90 + 80 + 57.5) / 3)


def test_forgetting_and_bwt(matrix):
    # task 0: best earlier 90 -> 50 (40); task 1: 90 -> 50 (40)
    assert matrix.forgetting() == pytest.approx(40.0)
    # (50 - 90 + 50 - 90) / 2
    assert matrix.bwt() == pytest.approx(-40.0)


def test_old_new_split(matrix):
    assert matrix.old_new(0) == {"old": None, "new": 90.0}
    assert matrix.old_new(2)["old"] == pytest.approx(100 * 15 / 30)
    assert matrix.old_new(2)["new"] == 80.0


def test_single_task_has_no_forgetting():
    m = AccuracyMatrix()
    m.add_row([3], [4])
    assert m.forgetting() is None and m.bwt() is None and m.last_acc() == 75.0


def test_rows_must_grow_by_one():
    m = AccuracyMatrix()
    with pytest.raises(ValueError):
        m.add_row([1, 2], [3, 4])


def test_state_round_trip(matrix):
    assert AccuracyMatrix.from_state_dict(matrix.state_dict()).summary() == matrix.summary()


def test_seed_groups_and_mean_std_by_hand():
    from slca_kit.report import mean_std, seed_groups, seed_table

    def run(name, seed, lr, last):
        config = {"name": name, "output_dir": "x", "scenario": {"class_order_seed": seed}, "train": {"lr": lr}}
        return {"name": name, "method": "slca", "config": config, "last_acc": last, "inc_acc": last + 10,
                "forgetting": None, "bwt": None}

    runs = [run("a1", 1993, 0.1, 40.0), run("b", 1993, 0.2, 10.0), run("a2", 1996, 0.1, 44.0),
            run("a3", 1997, 0.1, 45.0)]
    groups = seed_groups(runs)
    assert [[r["name"] for r in g] for g in groups] == [["a1", "a2", "a3"], ["b"]]
    mean, std = mean_std([40.0, 44.0, 45.0])
    assert mean == 43.0 and abs(std - (7.0 ** 0.5)) < 1e-12  # ((9 + 1 + 4) / 2) ** 0.5
    assert mean_std([5.0]) == (5.0, None)
    assert "| a1, a2, a3 | slca | 1993, 1996, 1997 | 43.00 ± 2.65 | 53.00 ± 2.65 | - | - |" in seed_table(groups[:1])


def test_report_writes_self_contained_html_pages(tiny_npz, tmp_path):
    """report.html per run and comparison.html: plots inlined as PNG data, tables with the run's numbers, nothing
    fetched from elsewhere."""
    import base64
    import html.parser

    from slca_kit.report import report
    from slca_kit.resolve import config_from_dict
    from slca_kit.trainer import Trainer

    from conftest import tiny_recipe

    runs = []
    for method in ("seq_ft", "slca"):
        recipe = tiny_recipe(tiny_npz, tmp_path, method=method)
        recipe["train"]["epochs"] = 1
        runs.append(Trainer(config_from_dict(recipe)).run())
    report([tmp_path / "tiny_seq_ft", tmp_path / "tiny_slca"], tmp_path / "compare")

    class Collect(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.sources, self.links, self.cells = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "img":
                self.sources.append(attrs["src"])
            if tag in ("script", "link") or "href" in attrs:
                self.links.append(tag)

        def handle_data(self, data):
            if data.strip():
                self.cells.append(data.strip())

    for path, results, images in ((tmp_path / "tiny_slca" / "report.html", runs[1], 2),
                                  (tmp_path / "compare" / "comparison.html", None, 1)):
        page = Collect()
        page.feed(path.read_text())
        assert not page.links and len(page.sources) == images
        for source in page.sources:  # each image is a whole PNG inside the page
            assert source.startswith("data:image/png;base64,")
            assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        if results is not None:
            assert f"{results['last_acc']:.2f} / {results['inc_acc']:.2f}" in page.cells
            row = page.cells.index("2", page.cells.index("task 2")) + 1  # the matrix row after task 2
            assert page.cells[row:row + 3] == [f"{v:.2f}" for v in results["accuracy_matrix"][2]]
    comparison = (tmp_path / "compare" / "comparison.html").read_text()
    assert "tiny_seq_ft" in comparison and "tiny_slca" in comparison and "class-incremental" in comparison
