"""The data side: MNIST files (``mnist``: finding, validating, downloading, reading), each rank's
batches (``batches``), on-device augmentation (``augment``)."""
