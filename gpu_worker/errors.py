"""The few outcomes a job can end in besides success; `outcome.py` maps each to ack / nak / term."""

from __future__ import annotations


class JobCancelled(Exception):
    """The job was cancelled; raised from the step callback so the engine stops at the step boundary."""


class JobLost(JobCancelled):
    """Another try of the job holds it now (this worker stalled past the ack wait and the job went to
    another): this try stops at its step boundary, as for a cancel, and writes nothing more."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JobExpired(Exception):
    """The job waited in the queue past its deadline and was not generated."""


MAX_REASON_CHARS = 2000  # a message with 60,000 bad fields must still fit a status record and a dead letter


class JobFailed(Exception):
    """The job cannot succeed however often it is tried (bad message, bad input, out of memory)."""

    def __init__(self, reason: str):
        if len(reason) > MAX_REASON_CHARS:
            reason = f"{reason[:MAX_REASON_CHARS]}... ({len(reason)} characters in all)"
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):
    """This worker cannot take the job now; another try (here or elsewhere) may succeed."""

    def __init__(self, reason: str, *, delay_s: float = 1.0):
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class Rerouted(Exception):
    """The job names a model this worker does not serve, and a live worker does: it was published to
    that model's lane (schemas.names.jobs_subject), and this message is done with."""

    def __init__(self, subject: str):
        super().__init__(subject)
        self.reason = f"published to {subject}, the lane of the model it names"
