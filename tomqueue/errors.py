"""The exception tree. Everything TomQueue raises on purpose derives from TomQueueError.

TomQueueError
├── ConfigError            a setting is missing or out of range
├── EnqueueError           a job cannot be enqueued (bad payload, bad arguments)
│   └── SerializationError the payload's attributes cannot be written as JSON
├── HandlerError           a stored handler cannot be turned back into an object
├── MessageError           a broker message is not a TomQueue notification
├── PublishError           a notification could not be confirmed by the broker
├── BrokerUnavailable      the broker cannot be reached
├── DatabaseUnavailable    the database cannot be reached
└── JobTimeout             a job ran past its max_run_time
"""

from __future__ import annotations


class TomQueueError(Exception):
    """Base class of every error TomQueue raises on purpose."""


class ConfigError(TomQueueError, ValueError):
    """A configuration field is missing or violates its constraint."""


class EnqueueError(TomQueueError, ValueError):
    """A job cannot be enqueued."""


class SerializationError(EnqueueError):
    """The payload cannot be written as a JSON handler."""


class HandlerError(TomQueueError):
    """A stored handler cannot be loaded: malformed, unknown kind or module not allowed."""


class MessageError(TomQueueError, ValueError):
    """A broker message body is not a valid TomQueue notification."""


class PublishError(TomQueueError):
    """A notification was returned as unroutable or not confirmed by the broker."""


class BrokerUnavailable(TomQueueError):
    """The AMQP broker cannot be reached."""


class DatabaseUnavailable(TomQueueError):
    """The database cannot be reached."""


class JobTimeout(TomQueueError):
    """Raised inside a job that ran past its max_run_time."""
