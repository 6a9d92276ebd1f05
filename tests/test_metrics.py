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
