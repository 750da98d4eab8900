"""The scheduler's sampler: greedy, generate's draw at top_p 1, and the nucleus cut."""

import numpy as np

from sparse_export.runtimes.generate import pick_token
from sparse_export.serve.scheduler import sample


def test_greedy_and_the_draw_of_generate():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=500).astype(np.float32) * 3
    assert sample(logits, 0.0, 1.0, rng) == int(np.argmax(logits))
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [sample(logits, 0.7, 1.0, a) for _ in range(50)] == [pick_token(logits, 0.7, b) for _ in range(50)]


def test_top_p_keeps_the_smallest_set_reaching_p():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(p).astype(np.float32)
    rng = np.random.default_rng(1)
    draws = [sample(logits, 1.0, 0.75, rng) for _ in range(2000)]
    assert set(draws) == {0, 1}                                  # 0.5 + 0.3 reach 0.75; 0.5 alone does not
    assert abs(draws.count(0) / len(draws) - 0.5 / 0.8) < 0.05   # renormalized within the nucleus
    assert set(sample(logits, 1.0, 0.4, rng) for _ in range(200)) == {0}
