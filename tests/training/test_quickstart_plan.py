"""The quickstart's time plan: the stages share what the data left of --total_minutes, or a fixed --budget_minutes."""

import time
from argparse import Namespace

import pytest
from helpers import load_example

quickstart = load_example("quickstart")


def minutes_ago(minutes: float) -> float:
    return time.time() - 60 * minutes


def test_fixed_budget_is_shared_by_the_recipe_shares():
    args = Namespace(total_minutes=15.0, budget_minutes=11.0)
    shares = [stage[2] for stage in quickstart.STAGES]
    # The data's time does not matter: the budget is the stages' training time.
    planned = [quickstart.stage_minutes(i, args, minutes_ago(9.0)) for i in range(len(shares))]
    assert planned == pytest.approx([11.0 * share for share in shares])


def test_stages_share_what_the_data_left_of_the_total():
    args = Namespace(total_minutes=15.0, budget_minutes=None)
    first = quickstart.stage_minutes(0, args, minutes_ago(3.0))
    left = 15.0 - 3.0 - quickstart.RESERVE_MINUTES
    assert first == pytest.approx(left * quickstart.STAGES[0][2], abs=0.01)
    # A slower data stage leaves less to train; the last stage gets all that is left after the first.
    assert quickstart.stage_minutes(0, args, minutes_ago(5.0)) < first
    last = quickstart.stage_minutes(1, args, minutes_ago(3.0 + first + 0.5))
    assert last == pytest.approx(left - first - 0.5, abs=0.01)


def test_no_time_left_is_a_clear_error():
    args = Namespace(total_minutes=5.0, budget_minutes=None)
    with pytest.raises(SystemExit, match="raise --total_minutes or pass --budget_minutes"):
        quickstart.stage_minutes(0, args, minutes_ago(4.5))
