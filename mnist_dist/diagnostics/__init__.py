"""Diagnosability: failures and slowdowns that explain themselves.

    watchdog.py   per-rank stack dumps (on a stall, on a collective failure, on SIGUSR2), heartbeats
                  in the launcher's store, and the failure report that names the missing ranks
    stacks.py     where a rank is: its innermost mnist_dist frame and the collective below it
    heartbeat.py  the heartbeats: each rank's phase and step in the torchrun store
    flight.py     torch's Flight Recorder (NCCL and gloo): switched on, dumped into <out-dir>/debug/
    network.py    the start-up network check (all_reduce + bandwidth probe, the socket interface)
    options.py    the diagnostic flags' checks

``python -m mnist_dist doctor --run-dir DIR`` (tools/doctor.py) reads what they leave in ``DIR/debug/``.
"""
