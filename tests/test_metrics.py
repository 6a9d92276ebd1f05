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
