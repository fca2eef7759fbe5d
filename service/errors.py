"""One base exception; one subclass per stage, carrying the stage name.

The CLI prints `error [stage]: message` and exits non-zero; the API maps `code` to 4xx/5xx.
Messages must never contain tokens (the settings keep them as SecretStr and nothing formats them).
"""

from __future__ import annotations


class HarmpruneError(Exception):
    stage = "job"
    code = "job_error"
    user_error = False  # True: the input is wrong (4xx); False: our side or the environment (5xx)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(HarmpruneError):
    stage = "spec"
    code = "invalid_spec"
    user_error = True


class ModelLoadError(HarmpruneError):
    stage = "load"
    code = "model_not_loadable"
    user_error = True


class UnsupportedModelError(HarmpruneError):
    stage = "load"
    code = "unsupported_model"
    user_error = True


class CalibrationError(HarmpruneError):
    stage = "elicit"
    code = "calibration_failed"


class AttributionError(HarmpruneError):
    stage = "attribute"
    code = "attribution_failed"


class OutputError(HarmpruneError):
    stage = "save"
    code = "output_not_writable"
    user_error = True


class PublishError(HarmpruneError):
    stage = "publish"
    code = "publish_failed"
    transient = False  # True: worth retrying (5xx, 429, connection errors)

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        if transient is not None:
            self.transient = transient


class JobCancelled(HarmpruneError):
    stage = "cancel"
    code = "cancelled"
