"""mnist-dist: a reference distributed (DDP) training job for MNIST."""

__version__ = "0.1.0"
