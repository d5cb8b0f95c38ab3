import pytest

from opr.metrics.continual import continual_metrics, learning_accuracy


def test_hand_computed_three_tasks():
    R = [
        [10, 20, 30],  # before training
        [60, 25, 35],  # after task 1
        [40, 70, 20],  # after task 2
        [50, 60, 80],  # after task 3
    ]
    m = continual_metrics(R)
    assert m["OP"] == pytest.approx((50 + 60 + 80) / 3)
    # BWT over tasks 1..T-1: ((50-60) + (60-70)) / 2
    assert m["BWT"] == pytest.approx(-10.0)
    assert m["BWT_1overT"] == pytest.approx(-20.0 / 3)
    # FWT: task 2: R[1,2]-R[0,2] = 25-20; task 3: R[2,3]-R[0,3] = 20-30 -> (5 - 10) / 2
    assert m["FWT"] == pytest.approx(-2.5)
    # MaxDrop: task 1: 60 - min(40, 50) = 20; task 2: 70 - 60 = 10 -> 15
    assert m["MaxDrop"] == pytest.approx(15.0)
    # LA: the diagonal 60, 70, 80
    assert learning_accuracy(R) == pytest.approx(70.0)


def test_no_forgetting_two_tasks():
    m = continual_metrics([[0, 0], [100, 0], [100, 90]])
    assert m == {"OP": 95.0, "BWT": 0.0, "BWT_1overT": 0.0, "FWT": 0.0, "MaxDrop": 0.0}


def test_single_task_has_no_transfer_metrics():
    m = continual_metrics([[5], [80]])
    assert m["OP"] == 80 and m["BWT"] is None and m["FWT"] is None


@pytest.mark.parametrize("bad", [[[1, 2]], [[1, 2], [3]], []])
def test_malformed_matrix(bad):
    with pytest.raises(ValueError, match="T\\+1 rows"):
        continual_metrics(bad)


def test_general_drift_by_hand():
    from opr.metrics.continual import general_drift

    assert general_drift([[58.0, 42.0], [10.0, 20.0], [14.0, 0.0]]) == -43.0  # (14 + 0)/2 - (58 + 42)/2
    assert general_drift([[58.0]]) == 0.0
    assert general_drift([]) is None and general_drift([[]]) is None
