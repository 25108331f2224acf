"""tools/bench_input.py: the per-op cost table runs and labels its rows."""
import numpy as np

from upright.tools import bench_input


def test_cost_table_rows_on_a_tiny_batch():
    images = np.random.default_rng(0).uniform(0, 255, [4, 8, 8, 3]).astype(np.float32)
    seeds = np.arange(8, dtype=np.int32).reshape(4, 2)
    rows = bench_input.benchmark_ops(images, seeds, spec="sometimes(0.5, jpeg); add|median_blur(3)",
                                     num_batches=1, warmup=0)
    labels = [label for label, _, _ in rows]
    assert labels == [
        "rotate90_random", "alone: jpeg(60,80)", "alone: add(-15,15)", "alone: median_blur(3)",
        "step: sometimes(0.5, jpeg(60,80))", "step: add(-15,15) | median_blur(3)",
        "host part", "device part",
        "policy 'sometimes(0.5, jpeg); add|median_blur(3)'",
        "rotate90_random + policy 'sometimes(0.5, jpeg); add|median_blur(3)'"]
    assert all(ips > 0 and cpu >= 0 for _, ips, cpu in rows)
    table = bench_input.format_cost_table(rows)
    assert table.splitlines()[0].split() == ["images/s", "CPU", "ms/img", "op"]
    assert len(table.splitlines()) == len(rows) + 1
