"""Process logging: one text line per record, or one JSON object per line (`--log-format json`).

A JSON line has `ts` (UTC, ISO 8601), `level`, `logger` and `msg`, plus `job_id`, `attempt` and
`duration_s` when the record has them: passed with `extra=`, or taken from the job a worker is
handling (`gpu_worker.job_context`), so every line logged while a job is handled names it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import TextIO

from gpu_worker.job_context import current_job

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
JOB_FIELDS = ("job_id", "attempt", "duration_s")


class JobContextFilter(logging.Filter):
    """Stamps each record with the job being handled, unless the call passed its own fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_job.get()
        if context is not None:
            for name, value in (("job_id", context.job_id or None), ("attempt", context.attempt), ("duration_s", context.duration_s)):
                if getattr(record, name, None) is None and value is not None:
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in JOB_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = round(value, 4) if isinstance(value, float) else value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def log_handler(log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: choose one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure(*, level: str = "INFO", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Replaces the root logger's handlers with one writing `log_format` lines to `stream` (stderr)."""
    logging.basicConfig(level=level.upper(), handlers=[log_handler(log_format, stream)], force=True)
