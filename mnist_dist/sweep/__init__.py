"""``mnist-dist sweep``: hyper-parameter sweeps on Optuna, every trial a real training run.

    space.py      the search space file (TOML): one table per training flag
    launchers.py  how a trial runs: a python or torchrun subprocess, or a SLURM array task
    command.py    the command: flags, checks, the study and its storage
    driver.py     the loop: ask, launch, report to the pruner, tell; stop and resume
    report.py     trials.csv, best.toml, sweep.png

Nothing on the training path imports this package; Optuna is imported only when a sweep runs.
"""
