"""Checkpoints: atomic files (``files``) and what a training run puts in them and takes back
(``state``: a symmetric capture/restore pair, RNG states, the resume choice)."""

from .files import (CHECKPOINT_DIR, FORMAT, REQUIRED_KEYS, VERSION, checkpoint_dir,  # noqa: F401
                    checkpoint_path, list_checkpoints, load, newest_loadable, prune, save)
