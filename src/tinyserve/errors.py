"""The one exception tree of tinyserve.

    TinyServeError
    ├── ConfigError              invalid configuration or command-line value
    │   └── RuntimeUnavailable   a runtime is not installed, or a provider has no device
    ├── DatasetError             a dataset is missing or malformed
    ├── CheckpointError          a checkpoint cannot be read or does not fit
    ├── ModelError               a model file is unusable
    │   ├── ModelNotFound        no such model or version in the repository
    │   └── ModelNotReady        the model exists but is not loaded yet
    ├── InputError               a request input is unusable
    │   ├── ImageDecodeError     the bytes are not a decodable image
    │   ├── UnsupportedMediaType the content type or image format is not accepted
    │   ├── PayloadTooLarge      too many bytes or too many pixels
    │   ├── MalformedRequest     the body is not the JSON or form the route reads
    │   └── InvalidParameter     a parameter is out of range or malformed
    ├── Overloaded               the queue is full; retry later
    ├── RateLimited              the client sent too many requests
    │   └── QuotaExceeded        an API key has used its quota for the day or month
    ├── InferenceTimeout         a request waited longer than its deadline
    │   └── DeadlineExceeded     its X-Request-Timeout cannot be met; refused at once
    ├── Unauthorized             no valid admin token or API key
    ├── Forbidden                the API key lacks the scope the route needs
    ├── RemoteError              a server answered a client with an error, or not at all
    └── InternalError            a bug: anything raised that is not a TinyServeError

Nothing here knows about HTTP: ``tinyserve.http_errors`` maps each class to a status code.
"""

from __future__ import annotations


class TinyServeError(Exception):
    """Base class of every error tinyserve raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(TinyServeError):
    code = "invalid_config"


class RuntimeUnavailable(ConfigError):
    code = "runtime_unavailable"


class DatasetError(TinyServeError):
    code = "dataset_error"


class CheckpointError(TinyServeError):
    code = "checkpoint_error"


class ModelError(TinyServeError):
    code = "model_error"


class ModelNotFound(ModelError):
    code = "model_not_found"


class ModelNotReady(ModelError):
    code = "model_not_ready"


class InputError(TinyServeError):
    code = "invalid_input"


class ImageDecodeError(InputError):
    code = "invalid_image"


class UnsupportedMediaType(InputError):
    code = "unsupported_media_type"


class PayloadTooLarge(InputError):
    code = "payload_too_large"


class MalformedRequest(InputError):
    code = "malformed_request"


class InvalidParameter(InputError):
    code = "invalid_parameter"


class Overloaded(TinyServeError):
    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(TinyServeError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(RateLimited):
    code = "quota_exceeded"


class InferenceTimeout(TinyServeError):
    code = "timeout"


class DeadlineExceeded(InferenceTimeout):
    code = "deadline_exceeded"


class Unauthorized(TinyServeError):
    code = "unauthorized"


class Forbidden(TinyServeError):
    code = "forbidden"


class RemoteError(TinyServeError):
    """What ``tinyserve.client`` raises: the server's status and error code (``status`` is
    None, and ``code`` ``unreachable``, when no answer came)."""

    def __init__(self, message: str, status: int | None, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class InternalError(TinyServeError):
    """Stands for an unexpected exception, so that a bug still gets a well-formed answer."""

    code = "internal"
