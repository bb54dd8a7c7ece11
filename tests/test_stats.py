"""harness/stats.py: the two-level bootstrap covers a known difference about 95% of the time, the
Holm-corrected test keeps its family-wise error under no difference, and it does not reject where
the old pooled McNemar test did (large seed variance, small question noise); the building blocks
against direct computations.

The simulated data: a reference and variants answer ``n_q`` test questions with several seeds.
Question q has a difficulty p_q ~ U(0.2, 0.8) (shared by every model and seed); a variant adds
its true effect ``delta``, a question x variant interaction (uniform, mean 0) and a seed effect
(normal, mean 0, one per variant and seed, at most 0.02 sd: leaving [0, 1] would take 10 sd), so
that the true accuracy difference is ``delta``. Within a seed the models share the uniform draw that decides a
question, except on a fraction ``discord`` of the questions, so that paired predictions agree
mostly, as trained models do.
"""
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from harness.stats import (MIN_SEEDS, Bootstrap, estimate, holm, mcnemar_exact, per_seed_mcnemar, question_share,
    resample_means)

BOOT = Bootstrap(resamples=1000, seed=7)
ALL = {"all": None}


def uniform_sd(rng, sd, size):
    """Mean 0, standard deviation ``sd``, bounded by sqrt(3) sd."""
    return rng.uniform(-math.sqrt(3) * sd, math.sqrt(3) * sd, size)


def simulate(rng, n_seeds=3, n_q=1000, deltas=(0.0, 0.01), seed_sd=0.01, interaction_sd=0.05, discord=0.15):
    """Correct answers, (len(deltas), n_seeds, n_q) booleans; deltas[0] is the reference's (0)."""
    p_q = rng.uniform(0.2, 0.8, n_q)
    out = np.empty((len(deltas), n_seeds, n_q), bool)
    inter = [np.zeros(n_q)] + [uniform_sd(rng, interaction_sd, n_q) for _ in deltas[1:]]
    for s in range(n_seeds):
        shared = rng.random(n_q)
        for v, d in enumerate(deltas):
            own = np.where(rng.random(n_q) < discord, rng.random(n_q), shared)
            out[v, s] = own < p_q + d + inter[v] + rng.normal(0, seed_sd)
    return out


def diff_estimate(a, ref, boot=BOOT):
    """The paired difference a - ref: the report's computation (shared question draws)."""
    n_s = a.shape[0]
    r = resample_means(np.concatenate([a, ref]), {"all": np.ones(a.shape[1], bool)}, boot)["all"]
    return estimate(a.astype(float) - ref, r[:n_s] - r[n_s:], boot, test=True)


# ----------------------------------------------------------------------------- the statistical properties


@pytest.mark.parametrize("scenario, params", [
    ("mixed", {"seed_sd": 0.01, "interaction_sd": 0.05, "discord": 0.15}),
    ("seed variance dominates", {"seed_sd": 0.02, "interaction_sd": 0.0, "discord": 0.05}),
])
def test_interval_covers_a_known_difference(scenario, params):
    rng = np.random.default_rng(1)
    delta, sims, covered, widths = 0.01, 200, 0, []
    for _ in range(sims):
        (ref, a) = simulate(rng, n_seeds=3, deltas=(0.0, delta), **params)
        e = diff_estimate(a, ref)
        assert e.seed_level and e.n_seeds == 3
        covered += e.lo <= delta <= e.hi
        widths.append(e.hi - e.lo)
    coverage = covered / sims
    print(f"{scenario}: coverage {coverage:.3f}, mean width {np.mean(widths):.4f}")
    assert 0.90 <= coverage <= 0.99, (scenario, coverage, np.mean(widths))


def test_resampling_three_seeds_as_they_are_undercovers():
    """Why the seed level is drawn from Student's t: the nonparametric resample of 3 seeds (the
    question level as in harness.stats) covers far less than 95% when seed variance dominates."""
    rng = np.random.default_rng(1)
    draws = np.random.default_rng(0).integers(0, 3, (BOOT.resamples, 3))
    sims, covered = 200, 0
    for _ in range(sims):
        ref, a = simulate(rng, n_seeds=3, deltas=(0.0, 0.01), seed_sd=0.02, interaction_sd=0.0, discord=0.05)
        r = resample_means(np.concatenate([a, ref]), {"all": np.ones(a.shape[1], bool)}, BOOT)["all"]
        rd = r[:3] - r[3:]
        reps = rd.mean(0) + np.take_along_axis(rd - rd.mean(0), draws.T, axis=0).mean(0)
        lo, hi = np.quantile(reps, [0.025, 0.975])
        covered += lo <= 0.01 <= hi
    assert covered / sims < 0.88


@pytest.mark.slow
def test_holm_corrected_test_under_no_difference_rejects_at_most_about_5_percent():
    rng = np.random.default_rng(2)
    sims, m, any_rejected, rejected = 400, 4, 0, 0
    for _ in range(sims):
        x = simulate(rng, n_seeds=3, deltas=(0.0,) * (m + 1))
        r = resample_means(x.reshape(-1, x.shape[-1]), {"all": np.ones(x.shape[-1], bool)}, BOOT)["all"]
        r = r.reshape(m + 1, 3, -1)
        ps = [estimate(x[v].astype(float) - x[0], r[v] - r[0], BOOT, test=True).p for v in range(1, m + 1)]
        adjusted = holm(ps)
        any_rejected += any(p < 0.05 for p in adjusted)
        rejected += sum(p < 0.05 for p in ps)
    print(f"family-wise rejections {any_rejected / sims:.3f}, per test {rejected / (sims * m):.3f}")
    assert any_rejected / sims <= 0.065  # family-wise, after Holm (Monte Carlo sd about 0.011)
    assert rejected / (sims * m) <= 0.065  # each uncorrected test, too


def test_pooled_mcnemar_rejects_where_the_two_level_test_does_not():
    """Large seed variance, small question noise, no true difference: the old test (discordant
    counts pooled over seeds, as if every seed's questions were new questions) rejects often;
    the two-level bootstrap does not."""
    rng = np.random.default_rng(3)
    sims, pooled_rej, two_level_rej, example = 200, 0, 0, None
    for _ in range(sims):
        ref, a = simulate(rng, n_seeds=3, deltas=(0.0, 0.0), seed_sd=0.02, interaction_sd=0.0, discord=0.05)
        b = int((a & ~ref).sum())
        c = int((~a & ref).sum())
        p_pooled = mcnemar_exact(b, c)
        p_two = diff_estimate(a, ref).p
        pooled_rej += p_pooled < 0.05
        two_level_rej += p_two < 0.05
        if example is None and p_pooled < 0.01 and p_two > 0.05:
            example = (p_pooled, p_two)
    assert pooled_rej / sims > 0.3
    assert two_level_rej / sims <= 0.07
    assert example is not None


# ----------------------------------------------------------------------------- building blocks


def test_resample_means_equals_a_direct_computation():
    rng = np.random.default_rng(4)
    x = rng.random((3, 50)) < 0.6
    types = np.arange(50) % 3 == 0
    boot = Bootstrap(resamples=100, seed=11)
    got = resample_means(x, {"all": np.ones(50, bool), "t": types}, boot)
    w = np.concatenate(list(boot.question_draws(50)))
    assert w.shape == (100, 50) and (w.sum(1) == 50).all()
    for b in (0, 37, 99):
        idx = np.repeat(np.arange(50), w[b].astype(int))  # the drawn questions, with repeats
        assert got["all"][:, b] == pytest.approx(x[:, idx].mean(1))
        sel = idx[types[idx]]
        assert got["t"][:, b] == pytest.approx(x[:, sel].mean(1))
    # fixed by the seed: the same draws for whoever asks, in blocks or not
    again = resample_means(x, {"all": np.ones(50, bool)}, boot)["all"]
    assert np.array_equal(again, got["all"])
    assert not np.array_equal(resample_means(x, {"all": np.ones(50, bool)}, Bootstrap(100, seed=12))["all"],
                              got["all"])


def test_question_draws_in_blocks_cover_every_resample(monkeypatch):
    import harness.stats as S

    monkeypatch.setattr(S, "_BLOCK_ELEMENTS", 30 * 7)  # blocks of 7 resamples of 30 questions
    blocks = list(Bootstrap(resamples=100, seed=1).question_draws(30))
    assert [len(b) for b in blocks] == [7] * 14 + [2]
    assert all((b.sum(1) == 30).all() for b in blocks)


def test_few_seeds_cover_the_questions_only():
    rng = np.random.default_rng(5)
    ref, a = simulate(rng, n_seeds=2)
    e = diff_estimate(a, ref)
    assert not e.seed_level and e.n_seeds == 2 and e.std is not None and e.lo < e.mean < e.hi
    one = diff_estimate(a[:1], ref[:1])
    assert one.std is None and not one.seed_level
    three = diff_estimate(*simulate(rng, n_seeds=MIN_SEEDS)[::-1])
    assert three.seed_level


def test_question_share():
    # additive seed and question effects, no seed x question noise: all of it is the questions'
    x = np.array([[0.0], [0.1], [0.3]]) + np.random.default_rng(0).random(40)
    assert question_share(x) == pytest.approx(1.0)
    # independent 0/1 noise only: the questions have no effect of their own
    noise = (np.random.default_rng(1).random((3, 2000)) < 0.5).astype(float)
    assert question_share(noise) < 0.1
    # questions of different difficulty answered with noise: about their share of the spread
    rng = np.random.default_rng(2)
    p = rng.uniform(0.0, 1.0, 20000)  # var(p) = 1/12; noise variance E[p(1 - p)] = 1/6
    x = (rng.random((3, 20000)) < p).astype(float)
    # MS_question ~ 3 var(p) + 1/6 = 5/12, MS_residual ~ 1/6: share ~ 1 - 2/5
    assert question_share(x) == pytest.approx(0.6, abs=0.03)
    # every question alike: nothing to resample
    assert question_share(np.tile([[0.0], [1.0], [1.0]], (1, 30))) == 0.0


def test_mcnemar_per_seed_and_holm():
    assert mcnemar_exact(3, 12) == pytest.approx(binomtest(3, 15, 0.5).pvalue)
    assert mcnemar_exact(0, 0) == 1.0
    a = np.array([[1, 1, 0, 0, 1], [1, 0, 0, 0, 0]], bool)
    r = np.array([[1, 0, 1, 0, 0], [1, 1, 1, 0, 0]], bool)
    assert per_seed_mcnemar(a, r) == [(2, 1, mcnemar_exact(2, 1)), (0, 2, mcnemar_exact(0, 2))]
    # Holm by hand: sorted 0.01, 0.02, 0.04 -> 3 x 0.01, 2 x 0.02, 1 x 0.04, made monotone
    assert holm([0.04, 0.01, None, 0.02]) == pytest.approx([0.04, 0.03, None, 0.04])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    assert holm([]) == []


def test_bootstrap_settings_are_checked():
    with pytest.raises(ValueError, match="resamples"):
        Bootstrap(resamples=10)
    with pytest.raises(ValueError, match="confidence"):
        Bootstrap(confidence=1.5)
    assert Bootstrap(resamples=1999).p_floor == pytest.approx(0.001)


@pytest.mark.parametrize("name", ["kd-losses", "teacher-depth", "msvd", "vqakd-weights"])
def test_research_grids_have_enough_seeds_for_seed_variance(name):
    from harness.execution import grid as G

    assert len(G.load(name).seeds) >= MIN_SEEDS
