"""`finetunekit search`: hyperparameter search with optuna over any recipe options (docs/search.md).

    space.py        the space file, checked against the recipe schema (torch-free)
    study.py        the worker loop: storage, sampler, pruner, one `fit` run per trial
    trial_addon.py  the add-on that reports each epoch to the trial and stops a pruned run
    storage.py      journal file / sqlite / postgresql, heartbeats, dead workers' trials re-queued
    ranks.py        several training processes: rank 0 samples, the others receive
    report.py       the ranked table, best.yaml, the parameter importances
"""
