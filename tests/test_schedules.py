import math

import pytest

from distill.schedules import CyclicCosine, MultiStep


def test_multistep_drops_at_epoch_starts():
    s = MultiStep((150, 180, 210), 0.1)
    assert s(0) == 1.0 and s(149.99) == 1.0
    assert s(150) == pytest.approx(0.1) and s(179.5) == pytest.approx(0.1)
    assert s(180) == pytest.approx(0.01) and s(239.9) == pytest.approx(0.001)


def test_multistep_rejects_unsorted_milestones():
    with pytest.raises(ValueError, match=r"MultiStep milestones=\[180, 150\]: expected a non-empty non-decreasing"):
        MultiStep((180, 150))


def test_cyclic_cosine_restarts_each_cycle():
    s = CyclicCosine([10, 20], min_factor=0.0)
    assert s(0) == pytest.approx(1.0)
    assert s(5) == pytest.approx(0.5)  # mid-cycle of a cosine from 1 to 0
    assert s(9.999) == pytest.approx(0.0, abs=1e-6)
    assert s(10) == pytest.approx(1.0)  # restart at the boundary
    assert s(20) == pytest.approx(0.5)
    assert s(30) == pytest.approx(0.0) and s(31) == pytest.approx(0.0)
    assert [s.cycle_of(e) for e in (0, 9.99, 10, 29.9, 35)] == [0, 0, 1, 1, 1]


def test_cyclic_cosine_warmup_and_floor():
    s = CyclicCosine([4], min_factor=0.1, warmup_epochs=1)
    assert s(0.5) == pytest.approx(0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.125))))
    assert s(4) == pytest.approx(0.1)
