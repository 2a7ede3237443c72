"""Which stored steps a training epoch replays (unpruned: its own; pruned: LPLD's draws) and the bounded window a rank
reads them through (pipelines/relabel_steps.py); real relabel stores on disk."""

from __future__ import annotations

import numpy as np

from labelstore.relabel import all_steps, open_relabel
from pipelines.relabel import StoreSteps
from pipelines.relabel_steps import AHEAD, StepWindow, epoch_rows, lpld_pool
from tests.test_relabel_store import fill, new_store

N_MANY = 120  # 30 steps of 4 per epoch


def many_steps(path, **kw):
    n = kw.pop("n", N_MANY)
    return new_store(path, files=[f"c{i % 2}/img_{i}.jpg" for i in range(n)], targets=[i % 2 for i in range(n)],
                     sizes=np.tile([40, 56], (n, 1)), rows_per_shard=8, **kw)


def test_an_unpruned_store_replays_each_epoch_in_order_and_a_pruned_one_draws_from_the_kept_steps(tmp_path):
    rs = new_store(tmp_path / "u")  # 3 epochs of 3 steps (4, 4, 2)
    assert epoch_rows(rs, 1, seed=0).tolist() == [3, 4, 5]
    # LPLD keeps the plan's first steps: here 5 of 9 (epoch 0, and epoch 1's steps 0 and 1)
    p = new_store(tmp_path / "p", kept=all_steps(3, 3)[:5], pruning={"how": "lpld"})
    fill(p)
    # row 2 (epoch 0's last step, short) -> row 1; row 4 (epoch 1, step 1) is not its epoch's last: kept
    assert lpld_pool(p).tolist() == [0, 1, 1, 3, 4]
    draws = [epoch_rows(p, e, seed=3).tolist() for e in range(3)]
    assert all(len(d) == 3 and set(d) <= {0, 1, 3, 4} for d in draws)  # steps_per_epoch draws, never row 2
    assert draws == [epoch_rows(open_relabel(tmp_path / "p"), e, seed=3).tolist() for e in range(3)]  # seeded
    assert draws != [epoch_rows(p, e, seed=4).tolist() for e in range(3)] and draws[0] != draws[1]
    counts = np.bincount(np.concatenate([epoch_rows(p, e, seed=0) for e in range(2000)]), minlength=5)
    share = counts / counts.sum()  # uniform over the pool's 5 entries: row 1 twice (it stands in for row 2)
    np.testing.assert_allclose(share, [0.2, 0.4, 0, 0.2, 0.2], atol=0.02)


def test_a_short_step_whose_predecessor_was_pruned_is_not_drawn(tmp_path):
    kept = np.array([[0, 0], [0, 2], [1, 0]])  # epoch 0's short last step kept, the step before it pruned
    p = new_store(tmp_path / "p", kept=kept, pruning={"how": "test"})
    assert p.step_sizes.tolist() == [4, 2, 4]
    assert lpld_pool(p).tolist() == [0, 2]  # every epoch then trains the same number of full steps


def test_the_window_holds_a_few_steps_not_the_epoch(tmp_path):
    """One epoch of 30 steps read through the window: each step as the store holds it, and never more than
    AHEAD + 1 steps held; the whole-epoch reader (StoreSteps) holds all 30."""
    rs = many_steps(tmp_path / "m", epochs=1)
    fill(rs)
    assert rs.steps_per_epoch == 30
    whole = StoreSteps(rs)
    epoch = whole.steps_of(0)
    epoch_bytes = sum(a.nbytes for a in (epoch.rows, epoch.coords, epoch.flips, epoch.partner)) + \
        sum(v.nbytes for v in whole._held[1].values())
    win = StepWindow(rs, seed=0, ahead=2)
    blk = rs.read_steps(0, 30)
    held = []
    try:
        for t in range(30):
            d = win.step(0, t)
            n = int(blk.step_size[t])
            assert d.rows.tolist() == blk.images[t, :n].tolist() and d.lam == blk.mix_lam[t]
            np.testing.assert_array_equal(d.labels["labels"], blk.labels[t, :n])
            np.testing.assert_array_equal(d.partner, blk.mix_partner[t, :n])
            assert win.step(0, t) is d  # a step trained as several pieces is read once
            held.append(len(win._pending))
            held_bytes = win.held_bytes()
            assert held_bytes <= 3 * epoch_bytes / 30 + 1, (t, held_bytes)
    finally:
        win.close()
    assert max(held) == 3 and AHEAD >= 1
    assert epoch_bytes > 9 * held_bytes
