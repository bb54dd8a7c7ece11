"""Statistics behind a report's verdicts: accuracy over seeds and test questions, paired
comparisons, per-seed McNemar tests and the Holm-Bonferroni correction. No Markdown here
(``harness.report`` renders what this module computes).

The data: for every run, a 0/1 vector of correct answers over the test questions, the same
question ids for every run of a data set. A variant has runs with several seeds; its accuracy
varies with the seed (training randomness) and with the test questions (a sample of the
questions the task could ask). Both are sources of error, and they are crossed: every seed
answers the same questions.

Two-level bootstrap (:func:`estimate`): each of ``resamples`` replicates is the observed mean
plus a question-level and a seed-level error,

1. questions: ``n_q`` test questions drawn with replacement, the same draw (the same question
   ids, as weights over the questions) for every seed and every variant of the data set, so that
   comparisons stay paired and the questions' shared sampling error is counted once. Its error is
   the change of the mean over the seeds on the drawn questions, scaled by the square root of the
   share of that spread which belongs to the questions themselves (:func:`question_share`, from
   the two-way ANOVA of seeds x questions); the rest, each seed's own noise on the questions, is
   already in the spread of the per-seed means that step 2 uses;
2. seeds: ``std / sqrt(n_s) * T``, with ``std`` the standard deviation of the per-seed means
   over the ``n_s`` seeds and ``T`` Student's t with ``n_s - 1`` degrees of freedom (stratified
   draws, :meth:`Bootstrap.seed_errors`): the resample of the seeds.

Why the seed level is drawn from t rather than by resampling the observed seeds: with 3 seeds
there are 10 distinct resamples, the bootstrap variance of their mean is biased by (n - 1) / n,
and its tails are those of the 3 observed values. A mean of n seeds with estimated variance has
Student's t error with n - 1 degrees of freedom, the resample of the seed level that stays honest
with few seeds (and approaches the nonparametric one as seeds grow).

The 95% interval is the 2.5 and 97.5 percentiles of the replicates; the two-sided p-value of a
difference is ``2 min(P(rep <= 0), P(rep >= 0))`` over the same replicates (with the +1 of Monte
Carlo p-values, so never below ``2 / (resamples + 1)``): p < 0.05 exactly when 0 is outside the
interval, up to Monte Carlo error. With fewer than :data:`MIN_SEEDS` seeds the seed level is not
estimated: the interval and p-value cover the test-question sampling only (unscaled; inference
about these trained runs, not about retraining) and say so (``Estimate.seed_level`` is False).

Measured by ``tests/test_stats.py`` (simulated predictions, 1,000 questions, 3 seeds, 1,000
resamples): the 95% interval covers a known difference in 95.0% of 200 data sets when seed
variance, question difficulty and a question x variant interaction mix, 95.5% when seed variance
dominates (resampling the 3 observed seeds instead: about 85%); under no difference, 4 comparisons
against one reference, Holm-corrected at 0.05, reject in 5.0% of 400 tables (6.3% per uncorrected
test); pooling McNemar's discordant counts over seeds, as reports did before, rejects in
60% of 200 null comparisons when seed variance dominates (the two-level test: 5%).

The resampling is fixed by :class:`Bootstrap` (seed and number of resamples, which reports
record in their header), so a report is reproducible. Everything is vectorised with numpy: the
question draws are count matrices, and a run's accuracy on every draw is one matrix product.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.stats import binomtest
from scipy.stats import t as _student_t

#: seeds needed to estimate the seed-to-seed variance (and to show an interval that covers it)
MIN_SEEDS = 3
#: default number of bootstrap resamples and the generator's seed (recorded in every report)
RESAMPLES = 2000
BOOTSTRAP_SEED = 20251123
CONFIDENCE = 0.95
#: question-draw elements generated at once (resamples x questions), to bound memory
_BLOCK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Bootstrap:
    """The resampling of a report: how many resamples, which generator seed, which confidence."""

    resamples: int = RESAMPLES
    seed: int = BOOTSTRAP_SEED
    confidence: float = CONFIDENCE

    def __post_init__(self):
        if self.resamples < 100:
            raise ValueError(f"bootstrap resamples must be >= 100, got {self.resamples}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"bootstrap confidence must be in (0.5, 1), got {self.confidence}")

    @property
    def p_floor(self) -> float:
        """The smallest p-value the resampling can give: 2 / (resamples + 1)."""
        return 2.0 / (self.resamples + 1)

    def question_draws(self, n_questions: int) -> Iterator[np.ndarray]:
        """Blocks of question weights, (block, n_questions) float32 counts: row b counts how often
        each question was drawn in resample b (``n_questions`` draws with replacement). The same
        blocks for a given seed and size, whoever asks (small ones are cached)."""
        if n_questions < 1:
            raise ValueError("no test question to resample")
        block = max(1, min(self.resamples, _BLOCK_ELEMENTS // n_questions))
        for i, start in enumerate(range(0, self.resamples, block)):
            yield _draws(self.seed, n_questions, i, min(block, self.resamples - start))

    def seed_errors(self, n_seeds: int) -> np.ndarray:
        """(resamples,) draws of Student's t with ``n_seeds - 1`` degrees of freedom: the seed
        level's standardised error (see the module docstring); the same for every cell with the
        same number of seeds. Stratified (the distribution's quantiles at (i + 1/2) / resamples,
        in a random order): independent draws of a t with 2 degrees of freedom put the 97.5%
        quantile of 1,000 draws anywhere from about 3.5 to 5 (exact: 4.30), and one fixed sample
        would bias every interval of a report the same way."""
        u = (np.arange(self.resamples) + 0.5) / self.resamples
        return np.random.default_rng([self.seed, 1, n_seeds]).permutation(_student_t.ppf(u, n_seeds - 1))


@functools.lru_cache(maxsize=4)
def _draws(seed: int, n_questions: int, block: int, size: int) -> np.ndarray:
    """One block of :meth:`Bootstrap.question_draws` (read-only: it is cached)."""
    rng = np.random.default_rng([seed, 0, n_questions, block])
    idx = rng.integers(0, n_questions, (size, n_questions)) + (np.arange(size) * n_questions)[:, None]
    w = np.bincount(idx.ravel(), minlength=size * n_questions).reshape(size, n_questions).astype(np.float32)
    w.flags.writeable = False
    return w


def resample_means(correct: np.ndarray, cells: dict[str, np.ndarray], boot: Bootstrap) -> dict[str, np.ndarray]:
    """For every cell (a boolean mask over the questions: a question type, or all) and every row
    of ``correct`` ((rows, n_questions), one row per run), the row's mean over the cell's
    questions in each question resample: ``{cell: (rows, resamples) float64}``. A resample that
    draws no question of a small cell gives NaN there."""
    x = np.asarray(correct, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"correct must be (runs, questions), got shape {x.shape}")
    out = {name: np.empty((x.shape[0], boot.resamples)) for name in cells}
    start = 0
    for w in boot.question_draws(x.shape[1]):
        stop = start + w.shape[0]
        for name, mask in cells.items():
            m = np.asarray(mask, dtype=bool)
            # (resamples, questions) @ (questions, runs): the fast orientation for BLAS
            if m.all():  # every question: no copies, and every resample draws n_questions
                out[name][:, start:stop] = (w @ x.T).T / x.shape[1]
                continue
            wm = w[:, m]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[name][:, start:stop] = (wm @ x[:, m].T).T / wm.sum(1)
        start = stop
    return out


def question_share(x: np.ndarray) -> float:
    """The share of the question-level spread of ``x`` ((n_s, n_q): per-seed values over the
    questions, n_s >= 2) that belongs to the questions themselves: ``max(0, 1 - MS_residual /
    MS_question)`` of the two-way ANOVA of seeds x questions. The rest, the seed x question noise,
    is already in the spread of the per-seed means that the seed level uses."""
    x = np.asarray(x, dtype=np.float64)
    ns, nq = x.shape
    if ns < 2 or nq < 2:
        return 1.0
    rows, cols, grand = x.mean(1), x.mean(0), x.mean()
    ms_question = ns * cols.var(ddof=1)
    if ms_question <= 1e-15:  # every question alike (up to rounding): nothing to resample
        return 0.0
    resid = x - rows[:, None] - cols[None, :] + grand
    ms_resid = float((resid ** 2).sum()) / ((ns - 1) * (nq - 1))
    return max(0.0, 1.0 - ms_resid / ms_question)


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (fractions, not percent) with its spread, interval and test against 0."""

    mean: float
    std: float | None  # sample std over seeds (ddof=1); None for one seed
    lo: float | None
    hi: float | None
    p: float | None  # two-sided bootstrap p-value of "the value is 0" (differences only)
    n_seeds: int
    seed_level: bool  # False: fewer than MIN_SEEDS seeds, the interval covers the questions only

    def scaled(self, factor: float) -> "Estimate":
        """The same estimate in other units (e.g. percent); p, n and seed_level unchanged."""
        f = lambda v: None if v is None else v * factor  # noqa: E731
        return Estimate(self.mean * factor, f(self.std), f(self.lo), f(self.hi), self.p, self.n_seeds,
                        self.seed_level)


def estimate(x: np.ndarray, resampled: np.ndarray, boot: Bootstrap, *, test: bool = False) -> Estimate:
    """Mean over seeds of ``x`` ((n_s, n_q): per-seed values over one cell's questions, e.g.
    correct answers, or a paired difference of two variants' correct answers) with its two-level
    bootstrap interval; ``resampled`` ((n_s, resamples)): the rows' means in each question
    resample (:func:`resample_means`, the same draws for everything compared). ``test``: also
    the two-sided p-value of "the mean is 0"."""
    x = np.asarray(x, dtype=np.float64)
    r = np.asarray(resampled, dtype=np.float64)
    ns = x.shape[0]
    if ns == 0 or r.shape != (ns, boot.resamples):
        raise ValueError(f"estimate: {ns} seeds of values but resampled means of shape {r.shape}")
    per_seed = x.mean(1)
    std = float(per_seed.std(ddof=1)) if ns > 1 else None
    rbar = r.mean(0)
    seed_level = ns >= MIN_SEEDS
    mean = float(per_seed.mean())
    if seed_level:
        shared = np.sqrt(question_share(x)) * (rbar - mean)  # the questions' shared sampling error
        reps = mean + shared + std / np.sqrt(ns) * boot.seed_errors(ns)
    else:
        reps = rbar
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return Estimate(mean, std, None, None, None, ns, seed_level)
    a = (1 - boot.confidence) / 2
    lo, hi = (float(v) for v in np.quantile(reps, [a, 1 - a]))
    p = None
    if test:
        n = len(reps)
        p = min(1.0, 2 * min((1 + np.sum(reps <= 0)) / (n + 1), (1 + np.sum(reps >= 0)) / (n + 1)))
    return Estimate(mean, std, lo, hi, p, ns, seed_level)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of min(b, c) in b + c at 1/2 (b, c: the
    discordant counts of one paired comparison)."""
    return float(binomtest(min(b, c), b + c, 0.5).pvalue) if b + c else 1.0


def per_seed_mcnemar(a: np.ndarray, ref: np.ndarray) -> list[tuple[int, int, float]]:
    """For each paired seed (row) of two (n_s, n_q) boolean matrices: (b, c, p) with b the
    questions ``a`` answers correctly and ``ref`` does not, c the reverse. Each seed is a valid
    paired test on its own; seeds are not pooled (a question is not independent of itself across
    seeds)."""
    a, ref = np.asarray(a, dtype=bool), np.asarray(ref, dtype=bool)
    b = (a & ~ref).sum(1)
    c = (~a & ref).sum(1)
    return [(int(bi), int(ci), mcnemar_exact(int(bi), int(ci))) for bi, ci in zip(b, c)]


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1) over the p-values
    given; None entries (no test) are left out of the family and stay None."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


class CorrectTable:
    """The correct answers of several runs on one test set, aligned on its questions, with their
    question resamples (one :meth:`Bootstrap.question_draws` shared by every run): the runs a
    report compares. Estimates are in percent.

    ``correct``: run id -> (n_q,) booleans, the same question order for every run; ``cells``: cell
    name (``"all"``, a question type) -> (n_q,) boolean mask of its questions."""

    #: the per-question values' dtype and the factor estimates are scaled by (right/wrong -> percent)
    dtype: type = bool
    scale = 100.0

    def __init__(self, correct: dict[str, np.ndarray], cells: dict[str, np.ndarray], boot: Bootstrap):
        self.runs = {r: i for i, r in enumerate(correct)}
        self.x = (np.stack([np.asarray(c, dtype=self.dtype) for c in correct.values()]) if correct
                  else np.zeros((0, 0), self.dtype))
        self.cells = {k: np.asarray(m, dtype=bool) for k, m in cells.items()}
        for k, m in self.cells.items():
            if m.shape != self.x.shape[1:]:
                raise ValueError(f"cell {k!r}: mask of shape {m.shape} for {self.x.shape[1]} questions")
        self.boot = boot
        self.means = resample_means(self.x, self.cells, boot) if correct else {}

    def __contains__(self, run_id: str) -> bool:
        return run_id in self.runs

    def _rows(self, run_ids: list[str]) -> list[int]:
        return [self.runs[r] for r in run_ids]

    def estimate(self, run_ids: list[str], cell: str = "all") -> Estimate:
        """Accuracy (%) of one variant's runs (one per seed) on a cell."""
        i, m = self._rows(run_ids), self.cells[cell]
        return estimate(self.x[i][:, m], self.means[cell][i], self.boot).scaled(self.scale)

    def compare(self, run_ids: list[str], ref_ids: list[str], cell: str = "all") -> Estimate:
        """Paired difference (points) ``run_ids[k] - ref_ids[k]`` (pairs: the same seed), with its
        p-value."""
        i, j, m = self._rows(run_ids), self._rows(ref_ids), self.cells[cell]
        d = self.x[i][:, m].astype(np.float64) - self.x[j][:, m]
        return estimate(d, self.means[cell][i] - self.means[cell][j], self.boot, test=True).scaled(self.scale)

    def mcnemar(self, run_ids: list[str], ref_ids: list[str]) -> list[tuple[int, int, float]]:
        """Per pair (seed): (b, c, exact McNemar p) over all questions."""
        return per_seed_mcnemar(self.x[self._rows(run_ids)], self.x[self._rows(ref_ids)])


class ValueTable(CorrectTable):
    """A :class:`CorrectTable` of real per-question values (a count's squared errors): the same
    two-level bootstrap of their means and paired differences, in the values' own unit; McNemar's
    test, which needs right / wrong answers, does not apply."""

    dtype = np.float64
    scale = 1.0

    def mcnemar(self, run_ids: list[str], ref_ids: list[str]) -> list[tuple[int, int, float]]:
        return []
