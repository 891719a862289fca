"""``mnist-dist sweep``: hyper-parameter sweeps on Optuna, every trial a real training run.

    space.py      the search space file (TOML): one table per training flag
    launchers.py  how a trial runs: a python or torchrun subprocess, or a SLURM array task
    driver.py     the command: flags, the study and its storage, the ask/launch/prune/tell loop
    report.py     trials.csv, best.toml, sweep.png

Nothing on the training path imports this package; Optuna is imported only when a sweep runs.
"""
