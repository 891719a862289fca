"""The data side: MNIST files (``mnist``), each rank's batches (``batches``), on-device augmentation
(``augment``).

The names most callers need are available here, so ``from mnist_dist import data`` then
``data.load_split(...)`` / ``data.TensorBatches(...)`` reads naturally. ``mnist``'s names are
imported with the package (no torch); ``batches``' names on first use (they need torch).
"""

from .mnist import (DATA_DIR_ENV, IDX_FILES, SUBSET_ENV, IMAGE_SIDE, MNIST_MEAN, MNIST_STD, NUM_CLASSES,  # noqa: F401
                    check_idx_file, classic_transform, download, load_split, missing_files, prepare,
                    raise_missing, raw_dir, read_split, resolve_data_dir, to_float, validate_files)

_FROM_BATCHES = ("LoaderBatches", "TensorBatches", "eval_shard", "rank_indices", "steps_per_epoch",
                 "train_sampler")


def __getattr__(name: str):
    if name in _FROM_BATCHES:
        from . import batches

        return getattr(batches, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
