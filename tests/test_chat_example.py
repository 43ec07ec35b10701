"""prism.examples.chat's command line: each method's defaults, and refusals of what cannot mean anything, before
anything is loaded."""

import pytest

from prism.examples import chat


@pytest.mark.parametrize("argv, message", [
    (["--method", "naive", "--metric", "balanced"], "--metric is PRISM's option"),
    (["--method", "prism", "--init", "default"], "PRISM needs full-rank factors"),
])
def test_the_chat_cli_refuses_meaningless_combinations(argv, message, capsys):
    with pytest.raises(SystemExit):
        chat.cli(argv)
    assert message in capsys.readouterr().err


def test_each_method_gets_its_own_defaults_and_explicit_options_win():
    prism, naive = chat.options([]), chat.options(["--method", "naive"])
    assert (prism.method, prism.init, prism.metric, prism.lr) == ("prism", "balanced", "balanced",
                                                                  chat.DEFAULT_LR["prism"])
    assert (naive.init, naive.lr) == ("default", chat.DEFAULT_LR["naive"])
    mine = chat.options(["--init", "pissa", "--metric", "frobenius", "--lr", "0.003"])
    assert (mine.init, mine.metric, mine.lr) == ("pissa", "frobenius", 0.003)
