"""The run directory and everything written into it: ``rundir`` (config.json, metrics.jsonl,
summary.json, model.pt), ``report`` (exact test predictions, confusion_matrix.json), ``plots`` (the
pictures), ``export`` (model.pt2), ``tracking`` (wandb). Importing this package imports nothing else."""
