"""UBC-OCEAN pipeline: raw slides -> tiles -> embeddings -> MIL classifiers with outlier detection -> submission."""

__version__ = "0.1.0"
