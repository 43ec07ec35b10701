"""The utility benchmark's tuning protocol: the same learning-rate grid for every method, extended past
the edge where a method's optimum lies (benchmarks/utility.py)."""

from benchmarks import common, utility  # python -m pytest from the repository root puts it on sys.path


def test_rate_past_continues_the_grid_in_one_three_steps():
    assert utility.rate_past(3e-2, 1e-2) == 1e-1
    assert utility.rate_past(3e-3, 1e-2) == 1e-3
    assert utility.rate_past(1e-1, 3e-2) == 3e-1
    assert utility.rate_past(1e-3, 3e-3) == 3e-4
    assert utility.rate_past(1e-2, 8e-3) == 3e-2 and utility.rate_past(4e-3, 3.5e-3) == 1e-2  # never the edge
    assert utility.rate_past(3e-3, 5e-3) == 1e-3


def _tuning_run(folder, method, lr, val_accuracy):
    epsilon = utility.tune_epsilon(method)
    common.write_json(utility.run_path(folder, "task", method, epsilon, 0, lr), dict(val_accuracy=val_accuracy))


def test_the_grid_grows_past_the_edge_of_the_optimum_until_it_is_inside(tmp_path):
    grid = [3e-3, 1e-2, 3e-2]
    for lr, acc in zip(grid, (0.5, 0.6, 0.7)):
        _tuning_run(tmp_path, "ffa", lr, acc)
    assert utility.tuning_grid(tmp_path, "task", "ffa", grid) == [3e-3, 1e-2, 3e-2, 1e-1]
    assert utility.tuned_lr(tmp_path, "task", "ffa", grid) is None  # waits for the run at 1e-1
    _tuning_run(tmp_path, "ffa", 1e-1, 0.65)
    assert utility.tuning_grid(tmp_path, "task", "ffa", grid) == [3e-3, 1e-2, 3e-2, 1e-1]
    assert utility.tuned_lr(tmp_path, "task", "ffa", grid) == 3e-2


def test_the_grid_grows_downwards_and_stops_after_edge_steps(tmp_path):
    grid = [3e-3, 1e-2, 3e-2]
    for lr, acc in zip([3e-4, 1e-3, *grid], (0.9, 0.8, 0.7, 0.6, 0.5)):
        _tuning_run(tmp_path, "nonprivate", lr, acc)
    assert utility.tuning_grid(tmp_path, "task", "nonprivate", grid) == [3e-4, 1e-3, *grid]
    assert utility.tuned_lr(tmp_path, "task", "nonprivate", grid) == 3e-4
    assert utility.tuned_lr(tmp_path, "task", "nonprivate", grid, edge_steps=1) == 1e-3
    assert utility.tuned_lr(tmp_path, "task", "nonprivate", grid, edge_steps=0) == 3e-3


def test_an_interior_optimum_keeps_the_common_grid(tmp_path):
    grid = [3e-3, 1e-2, 3e-2]
    for lr, acc in zip(grid, (0.6, 0.7, 0.5)):
        _tuning_run(tmp_path, "prism", lr, acc)
    assert utility.tuning_grid(tmp_path, "task", "prism", grid) == grid
    assert utility.tuned_lr(tmp_path, "task", "prism", grid) == 1e-2
