"""Stage 06: ensembling, the "Other" rule and the submission file; scoring against known labels."""
