"""The engine's small exception family and the exit codes of `python -m sgtm_engine run-stage`.

Stdlib only: the API and the worker parent import this module to map a child's exit code to a job state without
importing torch. Retryable failures (infrastructure: a killed child, a lost worker) are told apart from final ones
(a bad spec, bad data, a diverged run) by these codes.
"""

from __future__ import annotations


class SgtmError(Exception):
    """Base of every error the engine raises on purpose."""

    exit_code = 1


class ConfigError(SgtmError, ValueError):
    """A spec is invalid. `problems` lists every problem found, each naming the field, the value and the fix."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(SgtmError):
    """A data set is missing, corrupt (checksum mismatch) or cannot serve the requested split."""

    exit_code = 3


class TrainingDiverged(SgtmError):
    """The loss became non-finite; the run stops instead of writing a poisoned checkpoint."""

    exit_code = 4


class Cancelled(SgtmError):
    """A stop was requested (SIGTERM or a cancel flag); the stage checkpointed and stopped at a step boundary."""

    exit_code = 5


EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_CONFIG = ConfigError.exit_code
EXIT_DATA = DataError.exit_code
EXIT_DIVERGED = TrainingDiverged.exit_code
EXIT_CANCELLED = Cancelled.exit_code

#: Exit codes after which running the same spec again cannot help.
FINAL_FAILURE_CODES = frozenset({EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED})

EXIT_CODE_NAMES = {
    EXIT_OK: "ok",
    EXIT_UNEXPECTED: "unexpected_error",
    EXIT_CONFIG: "config_error",
    EXIT_DATA: "data_error",
    EXIT_DIVERGED: "training_diverged",
    EXIT_CANCELLED: "cancelled",
}
