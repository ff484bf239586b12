"""Stage 02: merge the competition's slides with external sources into one manifest, and the folds."""
