"""What a claim's rule can conclude, as codes; the report layer (`claim_text`) words them. The
thresholds the rules use are parameters, `report:` in params.yaml (`config.ReportConfig`)."""
HOLDS, FAILS, NOT_RESOLVED, NOT_TESTED = "holds", "does_not_hold", "not_resolved", "not_tested"
VERDICTS = (HOLDS, FAILS, NOT_RESOLVED, NOT_TESTED)

# why a rule could not weigh the compute (claims 1-3) or the trials (claim 4)
AT_FLOOR = "target_at_noise_floor"  # the target is within report.floor_margin of the metric's noise floor
NEVER_REACHED = "cmt_never_reached_target"  # the CMT init's mean curve never got to the target
NOT_RUN = "method_not_run"  # the claim's method is not in posttrain.methods
TOO_FEW_SEEDS = "too_few_seeds"  # fewer than report.min_seeds post-training seeds: no interval over seeds
# the paper does not say which compute it counted, and counting the teacher's pre-training or not
# gives different verdicts (the report gives both)
ACCOUNTING_UNKNOWN = "accounting_unknown"
NO_STUDY = "no_study"  # claim 4 without a sensitivity study in studies.specs
NO_COMPARISON = "no_comparison"  # a study without a cmt init, or without another init
TOO_FEW_TRIALS = "too_few_trials"  # an init finished fewer than report.min_trials trials
