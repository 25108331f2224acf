"""Fault campaigns (slow marker; CI skips them): every kill step of make_records,
20+ SIGKILLs at random moments, repeated concurrent runs, and thousands of
hostile image files through the reader of make_records and orient.

    python -m pytest -q -m slow tests/test_faults_slow.py -s
"""
import json
import random

import pytest

from tests import test_faults
from tests.test_faults import bench  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.slow


def test_kill_at_every_step_of_a_run(bench):  # noqa: F811
    """SIGKILL just before each change make_records makes to OUT's entries
    (staging folder, shard renames, the swap's removals and renames)."""
    states = {}
    for step in range(1, bench.steps + 1):
        state = test_faults.kill_at_step(bench, step, f"step{step}")
        states[state] = states.get(state, 0) + 1
    print(f"\nkill at each of {bench.steps} steps: {states}")
    assert set(states) <= {"old", "new", "refused"}
    assert states.get("old") and states.get("refused")


def test_kill_at_random_moments(bench):  # noqa: F811
    """25 SIGKILLs at uniformly random times over a whole run (start-up, reading,
    writing, swap), each followed by the checks and a rerun."""
    rng = random.Random(20261128)
    states, killed = {}, 0
    for i in range(25):
        # Uniform over the run's measured duration (the last 2 % left out: the
        # process may be exiting after its last write).
        state, was_running = test_faults.kill_after(
            bench, rng.uniform(0.02, 0.98) * bench.duration, f"timed{i}")
        states[state] = states.get(state, 0) + 1
        killed += was_running
    print(f"\n25 timed kills over a {bench.duration:.1f} s run: {states}, "
          f"{killed} while running")
    assert set(states) <= {"old", "new", "refused"}
    assert killed >= 20


def test_concurrent_runs_repeatedly(tmp_path):
    outcomes = []
    for i in range(5):
        (tmp_path / f"round{i}").mkdir()
        outcomes.append(test_faults.concurrent_pair(tmp_path / f"round{i}"))
    print(f"\nexit codes of 5 concurrent pairs: {outcomes}")
    assert [0, 1] in outcomes    # the runs did overlap, and one was refused


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_image_reader_campaign(tmp_path, seed):
    stats = test_faults.run_fuzz_campaign(tmp_path, examples=3000, seed=seed, timeout=3600)
    print("\n" + json.dumps({k: stats[k] for k in ("examples", "stored", "skipped", "reasons",
                                                   "kinds", "slowest_s", "input_peak_mb",
                                                   "tf_checked", "seconds")}))
    assert stats["input_peak_mb"] < test_faults.READER_PEAK_MB, stats["input_peak"]
