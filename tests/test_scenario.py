import numpy as np
import pytest

from slca_kit.config import ScenarioConfig
from slca_kit.data.scenario import build_scenario, reference_class_order, task_sizes_for
from slca_kit.errors import ConfigError


@pytest.mark.parametrize("seed", [1993, 1996, 1997])
@pytest.mark.parametrize("n", [100, 196, 200])
def test_class_order_is_the_reference_formula(seed, n):
    state = np.random.get_state()
    np.random.seed(seed)
    expected = np.random.permutation(n).tolist()
    np.random.set_state(state)
    assert reference_class_order(n, seed) == expected


def test_class_order_does_not_touch_global_numpy_state():
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    reference_class_order(100, 1993)
    assert (np.random.get_state()[1] == before).all()


def test_no_seed_keeps_natural_order():
    assert reference_class_order(5, None) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n, init, inc, remainder, expected", [
    (100, None, 10, "separate", [10] * 10),
    (196, 20, 20, "separate", [20] * 9 + [16]),  # Cars-196 (slca.md)
    (102, None, 10, "merge", [10] * 9 + [12]),  # Flowers proxy (shared/README.md)
    (102, None, 10, "separate", [10] * 10 + [2]),
    (100, 50, 10, "separate", [50] + [10] * 5),
    (200, None, 20, "separate", [20] * 10),
])
def test_task_sizes(n, init, inc, remainder, expected):
    assert task_sizes_for(n, init, inc, remainder) == expected


def test_scenario_labels_and_task_ids():
    scenario = build_scenario(ScenarioConfig(init_classes=None, increment=20, num_tasks=10, class_order_seed=1993), 196)
    assert scenario.task_sizes == tuple([20] * 9 + [16])
    order = np.random.RandomState(1993).permutation(196)
    mapping = scenario.label_map()
    # the class first in the order gets label 0, and so on
    assert all(mapping[order[k]] == k for k in range(196))
    assert scenario.task_classes(9) == list(range(180, 196))
    task_ids = scenario.class_task_ids()
    # the real task id of the last task's classes is 9, where the reference's c // 16 would say 11 or 12
    assert task_ids[180:].tolist() == [9] * 16
    assert task_ids[195] != 195 // 16
    assert scenario.seen_classes(0) == 20 and scenario.seen_classes(9) == 196


def test_declared_task_count_must_match():
    with pytest.raises(ConfigError, match="scenario.num_tasks: 10 declared.*11 tasks"):
        build_scenario(ScenarioConfig(increment=10, num_tasks=10), 102)


def test_init_larger_than_classes():
    with pytest.raises(ConfigError, match="scenario.init_classes"):
        build_scenario(ScenarioConfig(init_classes=20, increment=10), 10)
