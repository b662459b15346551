"""The speed measurement's clocks (evaluation/timing.py): the two sides of a comparison are
sampled in turn, so a machine that slows down during the measurement slows both."""

import pytest

from sparsebench.evaluation.timing import interleaved, median_beside


def test_the_sides_are_sampled_in_turn_after_their_warmup_and_the_median_is_kept():
    order, state = [], {"side": None}
    values = {"dense": iter([9.0, 1.0, 3.0, 2.0]), "sparse": iter([9.0, 5.0, 4.0, 6.0])}

    def use(side):
        state["side"] = side

    def sample():
        order.append(state["side"])
        return next(values[state["side"]])

    got = interleaved(use, sample, ("dense", "sparse"), repeats=3, warmup=1)
    # one warm-up each (9.0, never counted), then dense, sparse, dense, sparse, ...
    assert order == ["dense", "sparse"] + ["dense", "sparse"] * 3
    assert got == {"dense": 2.0, "sparse": 5.0}


def test_a_drift_during_the_measurement_falls_on_both_sides():
    """A machine 1% slower at every sample: dense then sparse (the old order) credits the
    drift to the sparse side; in turn, the ratio stays within one step of the true 2.0."""
    clock = {"t": 0, "side": None}

    def use(side):
        clock["side"] = side

    def sample():
        clock["t"] += 1
        cost = 2.0 if clock["side"] == "dense" else 1.0
        return cost * 1.01 ** clock["t"]

    got = interleaved(use, sample, ("dense", "sparse"), repeats=5, warmup=0)
    assert got["dense"] / got["sparse"] == pytest.approx(2.0 / 1.01, rel=1e-9)


def test_the_bandwidth_is_sampled_after_each_timed_run_not_after_the_warmup():
    """median_beside: one probe sample per counted run, in order, none for the warm-up, so a
    kernel's floor is the bandwidth of the seconds it was timed in."""
    events = []
    seconds, probes = median_beside(
        lambda: events.append("run"),
        lambda: events.append("probe") or float(len(events)),
        repeats=3,
        warmup=2,
    )
    assert events == ["run", "run"] + ["run", "probe"] * 3
    assert probes == [4.0, 6.0, 8.0] and seconds >= 0
