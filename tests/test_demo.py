"""The demo's verdict and seed table are worded from measured numbers, never a fixed sentence."""

from fkd_dali.demo import Outcome, sweep_table, verdict

SPREAD = {"seeds": 5, "fkd_minus_hard": (4.0, 7.0, 9.0), "fkd_minus_online": (-1.0, 0.2, 1.0)}


def outcome(**kw) -> Outcome:
    base = dict(teacher=92.0, hard=75.0, online=84.0, fkd=84.5, seconds_hard=100.0, seconds_online=140.0,
                seconds_fkd=100.0, seconds_labelling=10.0)
    base.update(kw)
    return Outcome(**base)


def test_verdict_states_both_halves_with_numbers():
    text = "\n".join(verdict(outcome(), SPREAD))
    assert "FKD matched online KD's accuracy: 84.5 % vs 84.0 % (+0.5; FKD − online KD over 5 seeds: mean +0.2" in text
    assert "It took 100 s against online KD's 140 s: 29 % less time; 21 % less with the one-off labelling (10 s)" in text
    assert "beat the hard-label student by 9.5 points (84.5 % vs 75.0 %)" in text
    assert "mean +7.0, range +4.0 to +9.0 points" in text  # the seed noise beside the one run


def test_verdict_says_a_small_or_negative_margin_as_it_is():
    small = "\n".join(verdict(outcome(fkd=76.0, online=76.5), SPREAD))
    assert "by only 1.0 points" in small and "within one run's noise" in small and "range +4.0 to +9.0" in small
    assert "by only 3.5 points" in "\n".join(verdict(outcome(fkd=78.5), SPREAD))  # below the sweep's smallest margin
    assert "by only" not in "\n".join(verdict(outcome(fkd=78.5), dict(SPREAD, seeds=0)))  # no sweep: 1 point
    worse = "\n".join(verdict(outcome(fkd=74.0, online=74.0), SPREAD))
    assert "did NOT beat the hard-label student: -1.0 points" in worse


def test_verdict_says_when_fkd_falls_short_of_online_kd_or_takes_longer():
    text = "\n".join(verdict(outcome(fkd=80.0, seconds_fkd=150.0), SPREAD))
    assert "fell 4.0 points short of online KD: 80.0 % vs 84.0 % (-4.0;" in text
    assert "7 % MORE time" in text and "14 % MORE with the one-off labelling" in text
    assert "beat online KD by 3.0 points" in "\n".join(verdict(outcome(fkd=87.0), SPREAD))


def test_sweep_table_gives_each_seed_and_the_spread():
    runs = [{"seed": s, "seconds": 300.0, "outcome": vars(outcome(hard=70.0 + s, fkd=80.0 + 2 * s))} for s in range(3)]
    table = sweep_table(runs)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 3
    assert lines[2].startswith("| 0 | 70.0 | 84.0 | 80.0 | 92.0 | +10.0 | -4.0 |")
    assert lines[-3].startswith("| **min** | 70.0 | 84.0 | 80.0 | 92.0 | +10.0 | -4.0 |")
    assert lines[-2].startswith("| **mean** | 71.0 | 84.0 | 82.0 | 92.0 | +11.0 | -2.0 |")
    assert lines[-1].startswith("| **max** | 72.0 | 84.0 | 84.0 | 92.0 | +12.0 | +0.0 |")
