"""The benchmarks' protocol: the same learning-rate grid for every method, extended past the edge where a
method's optimum lies (benchmarks/utility.py), and resumable sweeps (benchmarks/common.py)."""

import math

from benchmarks import common, utility


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


def test_the_chat_benchmark_extends_its_grid_towards_the_lowest_validation_loss(tmp_path):
    from types import SimpleNamespace

    from benchmarks import llm_sft

    args = SimpleNamespace(lr_grid=None, edge_steps=1)

    def tuning_run(lr, loss):
        common.write_json(llm_sft.run_path(tmp_path, "tune", "naive", llm_sft.TUNE_EPSILON, 0, lr),
                          dict(method="naive", lr=lr, val_loss=loss, val_perplexity=math.exp(loss)))

    for lr, loss in zip(llm_sft.DEFAULT_GRID, (2.0, 2.5, 3.0)):  # lowest loss at the lowest rate
        tuning_run(lr, loss)
    assert llm_sft.tuning_grid(tmp_path, "naive", args) == [3e-4, *llm_sft.DEFAULT_GRID]
    assert llm_sft.tuned_lr(tmp_path, "naive", args) is None  # waits for the run at 3e-4
    assert "| naive |  | 7.39 | 12.18 | 20.09 | * |" in llm_sft.table(tmp_path, args)
    tuning_run(3e-4, 2.2)
    assert llm_sft.tuned_lr(tmp_path, "naive", args) == 1e-3
    assert "| naive | 9.03 | **7.39** | 12.18 | 20.09 | 0.001 |" in llm_sft.table(tmp_path, args)


def test_the_run_queue_resumes_and_skips_runs_another_process_finished(tmp_path):
    first, second, third = (tmp_path / f"run{i}.json" for i in range(3))
    common.write_json(first, dict(val_accuracy=0.1))
    calls = []

    def finish_second_elsewhere():
        calls.append("second")
        common.write_json(third, dict(val_accuracy=0.3))  # as a parallel sweep would, before this one reaches it
        return dict(val_accuracy=0.2)

    def run_third():
        calls.append("third")
        return dict(val_accuracy=0.0)

    results = common.run_queue([(first, lambda: calls.append("first")), (second, finish_second_elsewhere),
                                (third, run_third)])
    assert calls == ["second"]
    assert [r["val_accuracy"] for r in results] == [0.1, 0.2, 0.3]


def test_rate_major_orders_every_method_centre_first_one_rate_at_a_time():
    order = utility.rate_major({"prism": [3e-3, 1e-2, 3e-2], "zeroshot": [None], "naive": [1e-3, 3e-3, 1e-2, 3e-2]})
    assert order == [("prism", 1e-2), ("zeroshot", None), ("naive", 1e-2), ("prism", 3e-2), ("naive", 3e-3),
                     ("prism", 3e-3), ("naive", 3e-2), ("naive", 1e-3)]
