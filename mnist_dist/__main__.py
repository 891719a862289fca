"""``python -m mnist_dist [COMMAND] ...``: train (the default), evaluate, download, plot, predict,
export, doctor, ray, sweep (mnist_dist/cli.py's COMMANDS)."""

from .cli import main

raise SystemExit(main())
