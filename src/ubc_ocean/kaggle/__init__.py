"""A Kaggle submission from trained runs: the bundle to upload as a dataset (:mod:`.bundle`), the wheels it
installs offline (:mod:`.wheels`), its notebook (:mod:`.notebook`) and what the notebook runs (:mod:`.runner`)."""
