"""One base exception; one subclass per stage, carrying the stage name.

The CLI prints `error [stage]: message` and exits non-zero; the API maps `code` to 4xx/5xx.
Messages must never contain tokens (the settings keep them as SecretStr and nothing formats them).
"""

from __future__ import annotations

from typing import Any


class HarmpruneError(Exception):
    stage = "job"
    code = "job_error"
    user_error = False  # True: the input is wrong (4xx); False: our side or the environment (5xx)

    def __init_subclass__(
        cls,
        *,
        stage: str | None = None,
        code: str | None = None,
        user_error: bool | None = None,
        **kwargs: Any,
    ) -> None:
        """A stage's error names its constants in its class line
        (`class SpecError(HarmpruneError, stage="spec", code="invalid_spec", user_error=True)`);
        what it does not name, it inherits."""
        super().__init_subclass__(**kwargs)
        if stage is not None:
            cls.stage = stage
        if code is not None:
            cls.code = code
        if user_error is not None:
            cls.user_error = user_error

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(HarmpruneError, stage="spec", code="invalid_spec", user_error=True):
    """The domain spec, a file it names or an option is invalid."""


class ModelLoadError(HarmpruneError, stage="load", code="model_not_loadable", user_error=True):
    """The model or checkpoint cannot be loaded."""


class UnsupportedModelError(
    HarmpruneError, stage="load", code="unsupported_model", user_error=True
):
    """The model has no weights harmprune can score and prune."""


class CalibrationError(HarmpruneError, stage="elicit", code="calibration_failed"):
    """Elicitation left nothing usable to calibrate or measure on."""


class AttributionError(HarmpruneError, stage="attribute", code="attribution_failed"):
    """Attribution scores could not be computed."""


class OutputError(HarmpruneError, stage="save", code="output_not_writable", user_error=True):
    """The output directory cannot be written (not empty, not a directory, no parent)."""


class PublishError(HarmpruneError, stage="publish", code="publish_failed"):
    """Publishing the checkpoint failed; `transient` says whether a retry may fix it."""

    transient = False  # True: worth retrying (5xx, 429, connection errors)

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class JobCancelled(HarmpruneError, stage="cancel", code="cancelled"):
    """The job was cancelled; raised at the next point that checks."""


class RequestRefused(HarmpruneError, stage="submit", code="invalid_request", user_error=True):
    """A job request the service will not take: `field` names what to change (a 4xx).

    `status` is the HTTP status the API answers with (422 unless a subclass says otherwise)."""

    status = 422

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        if code is not None:
            self.code = code


class NotPermitted(RequestRefused, code="not_permitted"):
    """The tenant may not read this model (or it does not exist: the answer is the same) or
    publish under this namespace."""

    status = 403


class QuotaExceeded(RequestRefused, code="quota_exceeded"):
    """A per-tenant quota or rate limit; `retry_after_s` says when to try again."""

    status = 429

    def __init__(self, field: str, message: str, *, retry_after_s: int) -> None:
        super().__init__(field, message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(HarmpruneError, stage="submit", code="unavailable"):
    """A dependency (job store, queue, Hub) does not answer; try again after `retry_after_s`."""

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code
