"""OverheadClock against sleeps of known length (tolerances of tens of ms: sleep overshoots, never undershoots)."""

from __future__ import annotations

import time

from lin_probe.monitor.overhead import OverheadClock


def test_share_is_own_time_over_wall_time() -> None:
    clock = OverheadClock()
    assert clock.share() == 0.0
    clock.start()
    with clock.measuring():
        time.sleep(0.10)
    time.sleep(0.10)  # the user's part
    share = clock.share()
    assert 0.35 < share < 0.55  # 0.10 / 0.20, with sleep overshoot on a loaded machine
    assert 0.10 <= clock.own_s < 0.16


def test_nested_blocks_count_once_and_the_running_block_counts() -> None:
    clock = OverheadClock()
    clock.start()
    with clock.measuring():
        with clock.measuring():
            time.sleep(0.05)
        assert clock.share() > 0.9  # everything so far is the monitor's, though the block is still open
    assert 0.05 <= clock.own_s < 0.09
