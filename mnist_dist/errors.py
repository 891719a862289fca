"""The one exception type that means "the user asked for something we cannot do".

Raised anywhere, caught once in the CLI: printed as a single ``error: ...`` line
(prefixed with the rank under a launcher) and turned into exit code 2, never a traceback.
"""


class UserError(Exception):
    """Bad input: a flag, a file or an environment the job cannot work with."""


# Exit codes of the CLI (documented in docs/launching.md, "Errors and exit codes").
EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # a stop signal was handled: a checkpoint was saved; resume with --resume auto
EXIT_RANK_FAILURE = 4  # a collective failed or timed out (a rank was lost); report in <out-dir>/debug/


class StopTraining(Exception):
    """Raised on every rank after the ranks agreed to stop and the stop checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
        self.checkpoint = checkpoint


class RankFailure(Exception):
    """A collective failed or timed out. The message is the report: its first line names the missing
    rank(s); the next lines say where each rank was (diagnostics/watchdog.py). Exit code 4."""
