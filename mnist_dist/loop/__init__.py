"""The training loop: step and epoch (``trainer``), exact evaluation (``evaluate``), the time-to-target
clock (``clock``), warm-up, stop signals, optimizer/scheduler builders and the checkpointed progress."""
