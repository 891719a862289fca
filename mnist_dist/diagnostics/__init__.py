"""Diagnosability: failures and slowdowns that explain themselves.

    dumps.py      a rank's stacks on SIGUSR2 (and on fatal signals) in <out-dir>/debug/rank-N.txt
    watchdog.py   under a process group: stack dumps on a stall or a collective failure, heartbeats
                  in the launcher's store, and the failure report that names the missing ranks
    stacks.py     where a rank is: its innermost mnist_dist frame and the collective below it
    heartbeat.py  the heartbeats: each rank's phase and step in the torchrun store, every call with a deadline
    report.py     the failure report's lines: the missing ranks, or "lost the store and every peer"
    flight.py     torch's Flight Recorder (NCCL and gloo): switched on, dumped into <out-dir>/debug/
    network.py    the start-up network check (all_reduce + bandwidth probe, the socket interface)
    profile.py    --profile: torch.profiler over a window of steps, a trace per rank, the summary

``python -m mnist_dist doctor --run-dir DIR`` (tools/doctor.py) reads what they leave in ``DIR/debug/``.
"""
