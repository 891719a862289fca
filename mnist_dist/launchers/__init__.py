"""Launchers that start the ranks themselves and hand each one to ``train.fit`` (Ray Train).

torchrun, SLURM and containers need no module here: they set RANK / WORLD_SIZE / MASTER_ADDR and
run ``train_ddp.py``. A launcher module is needed only where the launcher owns the worker processes
and the process group, and calls a Python function instead of a script.
"""
