"""`lorakit sweep`: a hyperparameter search with Optuna, each trial a full lorakit run.

space.py (the search space), section.py (the `sweep:` section read and checked), expressions.py (tied values),
recipes.py (every sampled recipe checked before trial 1), study.py (storage, resume, workers), trial.py (one
trial through the run lifecycle), report.py (table, CSV, best.yaml, plots).
"""
