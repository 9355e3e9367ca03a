"""The report's words for the claims: each claim's sentence, what was measured, the verdict and the
paper's figure, from the structured results of `evidence` (claims 1-3) and `sensitivity` (claim 4).
The rules that reach the verdicts live there; only the wording lives here."""
from __future__ import annotations

import math

from . import methods
from .config import ReportConfig
from .verdicts import ACCOUNTING_UNKNOWN, AT_FLOOR, FAILS, HOLDS, NEVER_REACHED, NO_COMPARISON, NO_STUDY, \
    NOT_RESOLVED, NOT_RUN, NOT_TESTED, TOO_FEW_SEEDS, TOO_FEW_TRIALS

WORDS = {HOLDS: "holds at this scale", FAILS: "does not hold at this scale",
         NOT_RESOLVED: "not resolved at this scale", NOT_TESTED: "not tested at this scale"}
TARGETS = {"diffusion": "the diffusion init's final value", "random": "the random init's final value"}
ACCOUNTING_WORDS = {"total": "counting every stage", "given_teacher": "with the teacher given (its pre-training not counted)"}
PAPERS = " (the paper's accounting)"
MEASURE_WORDS = {"flops": "counted FLOPs", "device_hours": "wall time"}
EFFECT_WORDS = {"improved": "improved", "worse": "**worse**", "unresolved": "no resolved change"}
SOURCE = "Hu, Lai, Mitsufuji, Ermon 2025, Consistency Mid-Training (arXiv 2509.24526)"
# claim 4 is about every method at once; the figures of claims 1-3 are in each method's module
SENSITIVITY_PAPER = "post-training from CMT is stable and much less sensitive to hyperparameters"


def verdict(claim: dict) -> str:
    return WORDS[claim["verdict"]]


def paper(claim_id: int, method: str) -> str:
    """The paper's figure for a claim, as it applies to `method` (its module's `paper`)."""
    if claim_id == 4:
        return SENSITIVITY_PAPER
    figure = methods.get(method).paper.get(claim_id) if method in methods.REGISTRY else None
    return figure or f"the paper gives no figure for {methods.label(method)}"


def sentence(claim: dict) -> str:
    """What the claim says, for this run's metric and method."""
    method, metric = claim["method"], claim["facts"].get("metric")  # claim 4 is about no one metric
    label = methods.label(method)
    if claim["id"] == 1:
        return f"{label} from CMT reaches the diffusion init's final `{metric}` with less total compute than from diffusion"
    if claim["id"] == 2:
        return f"{label} from CMT reaches the random init's final `{metric}` with less data and compute than from random"
    if claim["id"] == 3:
        return (f"{label} from CMT reaches the from-scratch (random init) final 1-step `{metric}` with "
                f"{methods.get(method).saving} total time, ending equal or better")
    if "study" in claim:
        return f"CMT makes {label} post-training less sensitive to hyperparameters (study `{claim['study']}`)"
    return "CMT makes post-training less sensitive to hyperparameters"


def _less(saving: float) -> str:
    if math.isnan(saving):  # a ratio over zero: the init compared against needed none of it
        return "no comparable share of (the other init needed none)"
    return f"{saving:.0%} less" if saving >= 0 else f"{-saving:.0%} more"


def _undecided(claim: dict, rules: ReportConfig) -> str:
    facts = claim["facts"]
    if claim["reason"] == AT_FLOOR:
        return (f"the target ({facts['target']:.3g}) is within {rules.floor_margin}x the metric's noise floor "
                f"({facts['floor']:.3g}): reaching it cannot be told from sampling noise")
    if claim["reason"] == NEVER_REACHED:
        return "the CMT init's mean curve never reached the target"
    if claim["reason"] == NOT_RUN:
        return f"{methods.label(claim['method'])} was not run (posttrain.methods)"
    if claim["reason"] == NO_STUDY:
        return "needs the Optuna sensitivity study (not run in this pipeline yet)"
    raise ValueError(f"claim {claim['id']}: no words for reason {claim['reason']!r}")


def _bound(x: float) -> str:
    return "∞" if math.isinf(x) else "undefined" if math.isnan(x) else f"{x:.2f}"


def _per_accounting(intervals: dict[str, dict], paper: str | None, confidence: float) -> str:
    return "; ".join(f"{ACCOUNTING_WORDS[acc]}{PAPERS if acc == paper else ''} {_bound(iv['ratio'])}, "
                     f"{confidence:.0%} interval {_bound(iv['low'])} to {_bound(iv['high'])}"
                     for acc, iv in intervals.items())


def ratios(claim: dict, rules: ReportConfig, what: str) -> str:
    """`what` (e.g. "CMT / diffusion compute to target") in the verdict's measure under each accounting
    with its interval, which accounting the verdict rests on, the ratios this run could have resolved,
    and the other measure beside it (with the verdict it alone would give, where that differs)."""
    facts = claim["facts"]
    paper, confidence = facts["accounting"], facts["confidence"]
    basis = facts["intervals"][paper or "total"]
    resolvable = (f"; at this seed spread the run resolves ratios below {basis['resolvable']:.2f} or above "
                  f"{1 / basis['resolvable']:.2f}" if basis["resolvable"] else "; the interval is unbounded")
    reason = ""
    if claim["reason"] == TOO_FEW_SEEDS:
        reason = f"; fewer than {rules.min_seeds} seeds: no interval decides"
    elif claim["reason"] == ACCOUNTING_UNKNOWN:
        reason = "; the paper does not say which compute it counted, and the two accountings disagree"
    elif not paper:
        reason = "; the paper does not say which compute it counted: both accountings agree"
    beside = []
    for measure, intervals in facts["beside"].items():
        alone = facts["alone"][measure]
        differs = (f" (on {MEASURE_WORDS[measure]} alone the verdict would be: {WORDS[alone]})"
                   if alone != claim["verdict"] and claim["reason"] is None else "")
        beside.append(f"; in {MEASURE_WORDS[measure]}: {_per_accounting(intervals, paper, confidence)}{differs}")
    return (f"{what} in {MEASURE_WORDS[facts['measure']]} (the verdict's measure): "
            + _per_accounting(facts["intervals"], paper, confidence) + resolvable + reason + "".join(beside))


def measured(claim: dict, rules: ReportConfig) -> str:
    """What the run measured, in a sentence."""
    facts, method = claim["facts"], claim["method"]
    if claim["id"] == 4 and "study" in claim:
        return measured_sensitivity(claim)
    if claim["reason"] in (AT_FLOOR, NEVER_REACHED, NOT_RUN, NO_STUDY):
        text = _undecided(claim, rules)
        if claim["id"] == 3 and "final_key" in facts:
            text += (f"; final 1-step `{facts['final_key']}` CMT {facts['final_cmt']:.3g} vs scratch "
                     f"{facts['final_random']:.3g} (paper: {methods.get(method).from_scratch})")
        return text
    if claim["id"] == 1:
        return (ratios(claim, rules, "CMT / diffusion compute to target")
                + f"; post-training only: {claim['ratio_posttrain']:.2f}"
                + ("; the CMT init met the target before any post-training" if facts["met_before_posttrain"] else "")
                + f"; CMT seeds reaching it: {facts['seeds_reached']}/{facts['seeds']}")
    if claim["id"] == 2:
        return (ratios(claim, rules, "CMT / random compute to target")
                + f"; from CMT: {_less(claim['saving_data'])} post-training data, "
                f"{_less(claim['saving_posttrain'])} post-training time (paper: {methods.get(method).saving or 'no figure'})")
    if claim["id"] == 3:
        return (ratios(claim, rules, "CMT / scratch total time to the target") + f" (paper: {methods.get(method).saving})"
                + f"; final 1-step `{facts['final_key']}` CMT {facts['final_cmt']:.3g} vs scratch "
                f"{facts['final_random']:.3g} (paper: {methods.get(method).from_scratch})")
    raise ValueError(f"claim {claim['id']}: no words for it")


def effect_line(row) -> str:
    """One row of the report's "did post-training help?" table."""
    return (f"| {methods.label(row['method'])} | {row['init']} | {row['before']:.4g} | {row['after']:.4g} | "
            f"{row['change']:+.3g} ({row['low']:+.3g} to {row['high']:+.3g}) | {EFFECT_WORDS[row['effect']]} |")


def measured_sensitivity(found: dict) -> str:
    """Claim 4's measurement from `sensitivity.sensitivity_claim`."""
    facts, comparisons = found["facts"], found["comparisons"]
    within, per = facts["within"], facts["inits"]
    if found["reason"] == NO_COMPARISON:
        return "needs a cmt study and a random or diffusion study"
    if found["reason"] == TOO_FEW_TRIALS:
        return (f"fewer than {facts['min_trials']} finished trials: "
                + ", ".join(f"{i} ({per[i]['finished']})" for i in facts["few"]))
    others = list(comparisons)
    parts = [f"{o} {c['other']:.0%} of {per[o]['finished']} (difference {c['difference']:+.2f}, 90% interval "
             f"{c['ci90'][0]:+.2f} to {c['ci90'][1]:+.2f})" for o, c in comparisons.items()]
    reached = [f"{o} (at most {c['target']:.3g}): cmt {c['cmt_reach']:.0%} vs {c['other_reach']:.0%} (difference "
               f"{c['reach_difference']:+.2f}, 90% interval {c['reach_ci90'][0]:+.2f} to {c['reach_ci90'][1]:+.2f})"
               for o, c in comparisons.items()]
    diverged = ", ".join(f"{i} {per[i]['diverged_fraction']:.0%}" for i in ["cmt", *others])
    # context, not the verdict: where the landscape sits, and how far its middle is from its best
    levels = ", ".join(f"{i} {per[i]['best']:.3g} / {per[i]['median']:.3g}" for i in ["cmt", *others])
    return (f"Share of finished trials within {within:.0%} of the init's best value: cmt "
            f"{per['cmt']['within_best']:.0%} of {per['cmt']['finished']} vs {'; '.join(parts)}; "
            f"diverged: {diverged}. Best / median final value: {levels}. Not in the verdict: share reaching "
            f"a common target, within {within:.0%} of the worse of the two bests, vs {'; vs '.join(reached)}.")
