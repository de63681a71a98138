"""cramfs.watermarks: hysteresis, full, pressure, events, listeners, validation."""

import pytest

from cramfs.watermarks import EVENT_FULL, EVENT_HIGH, EVENT_LOW, State, Watermarks

CAP = 1000 * 4096


@pytest.fixture
def wm():
    return Watermarks(CAP, low=0.5, high=0.8)


def at(fraction: float) -> int:
    return int(CAP * fraction)


def test_defaults():
    w = Watermarks(CAP)
    assert (w.low, w.high, w.state) == (0.80, 0.90, State.OK)
    assert w.events == {EVENT_HIGH: 0, EVENT_LOW: 0, EVENT_FULL: 0}


def test_hysteresis(wm):
    seen = []
    wm.subscribe(lambda old, new: seen.append((old, new)))
    wm.update(at(0.8))  # at the line is not above it
    assert wm.state is State.OK
    wm.update(at(0.81))
    assert wm.state is State.PRESSURE
    for fraction in (0.79, 0.6, 0.5, 0.9, 0.51):  # stays until below low
        wm.update(at(fraction))
        assert wm.state is State.PRESSURE
    wm.update(at(0.49))
    assert wm.state is State.OK
    wm.update(at(0.79))
    assert wm.state is State.OK
    assert wm.events == {EVENT_HIGH: 1, EVENT_LOW: 1, EVENT_FULL: 0}
    assert seen == [(State.OK, State.PRESSURE), (State.PRESSURE, State.OK)]
    assert wm.generation == 2


def test_full_on_failed_alloc_and_how_it_clears(wm):
    seen = []
    wm.subscribe(lambda old, new: seen.append((old, new)))
    wm.update(at(0.3), alloc_failed=True)
    assert wm.state is State.FULL
    assert wm.pressure(at(0.0)) == 1000
    wm.update(at(0.95))
    assert wm.state is State.FULL  # still above high
    wm.update(at(0.7))
    assert wm.state is State.PRESSURE  # room below high, not yet below low
    wm.update(at(0.95), alloc_failed=True)
    assert wm.state is State.FULL
    wm.update(at(0.1))
    assert wm.state is State.OK
    assert wm.events == {EVENT_HIGH: 0, EVENT_LOW: 1, EVENT_FULL: 2}
    assert seen == [(State.OK, State.FULL), (State.FULL, State.PRESSURE),
                    (State.PRESSURE, State.FULL), (State.FULL, State.OK)]


def test_repeated_failures_are_one_event(wm):
    wm.update(at(0.99), alloc_failed=True)
    wm.update(at(0.99), alloc_failed=True)
    assert wm.events[EVENT_FULL] == 1
    assert wm.generation == 1


def test_pressure_scale(wm):
    assert wm.pressure(0) == 0
    assert wm.pressure(at(0.5)) == 0
    assert wm.pressure(at(0.65)) == 500
    assert wm.pressure(at(0.8)) == 1000
    assert wm.pressure(CAP) == 1000
    values = [wm.pressure(used) for used in range(0, CAP + 1, 4096)]
    assert values == sorted(values)
    assert all(0 <= v <= 1000 for v in values)


def test_headroom(wm):
    assert wm.headroom(0) == wm.high_bytes() == at(0.8)
    assert wm.headroom(at(0.8)) == 0
    assert wm.headroom(CAP) == 0
    assert wm.low_bytes() == at(0.5)


def test_unsubscribe(wm):
    seen = []
    unsubscribe = wm.subscribe(lambda old, new: seen.append(new))
    wm.update(CAP)
    unsubscribe()
    wm.update(0)
    assert seen == [State.PRESSURE]
    assert wm.events[EVENT_LOW] == 1


def test_set_marks_applies_at_once(wm):
    wm.update(at(0.7))
    assert wm.state is State.OK
    wm.set_marks(0.3, 0.6, at(0.7))
    assert wm.state is State.PRESSURE
    assert (wm.low, wm.high) == (0.3, 0.6)
    wm.set_marks(0.75, 0.9, at(0.7))
    assert wm.state is State.OK


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.9, 0.8), (0.5, 0.5), (-0.1, 0.5), (0.5, 1.1), (float("nan"), 0.5), (0.1, float("inf")),
     ("0.1", 0.5), (0.1, None), (True, 0.5), (0, True)],
)
def test_bad_marks_raise_and_change_nothing(wm, low, high):
    wm.update(at(0.9))
    before = (wm.low, wm.high, wm.state, dict(wm.events), wm.generation)
    with pytest.raises(ValueError):
        wm.set_marks(low, high, 0)
    assert (wm.low, wm.high, wm.state, dict(wm.events), wm.generation) == before


@pytest.mark.parametrize(("low", "high"), [(0.9, 0.8), (0.5, 0.5), (-1, 0.5), (0.1, 2)])
def test_bad_marks_at_construction(low, high):
    with pytest.raises(ValueError):
        Watermarks(CAP, low=low, high=high)


def test_integer_marks_accepted(wm):
    wm.set_marks(0, 1, 0)
    assert (wm.low, wm.high) == (0.0, 1.0)
