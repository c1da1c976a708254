"""The broker's log output: human lines or one JSON object per line, never a secret.

`configure(level, fmt)` is called once by `park-broker` before anything logs.
With `fmt="json"` every record becomes one line on stderr:

    {"time": "2026-11-25T12:00:00.123Z", "level": "INFO", "logger": "park_broker.server",
     "message": "site sns serving ...", "address": "127.0.0.1:7701"}

`time` is UTC (RFC 3339, milliseconds); fields passed with `extra={...}` are
added as keys of their own (values that JSON cannot hold are written with
`str`); an exception adds `exception` (the formatted traceback).

Secrets: nothing in Park should log a token, and `Redactor`, installed on the
handler for both formats, is the safety net if something does. It replaces
`Bearer <anything>`, long base64url runs (tokens are hundreds of characters of
base64url; ids and digests are at most 64) and the value of any `extra` field
whose name says it is a secret (token, authorization, password, secret,
passphrase, private_key).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import sys
from typing import Any, TextIO

__all__ = ["FORMATS", "LEVELS", "add_arguments", "configure", "JsonFormatter", "Redactor", "redact"]

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"

_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"']+")
_LONG_B64URL = re.compile(r"[A-Za-z0-9_\-]{80,}={0,2}")
_SECRET_FIELD = re.compile(r"(?i)token|authorization|password|secret|passphrase|private_key")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """`text` with bearer credentials and token-like runs replaced by [redacted]."""
    return _LONG_B64URL.sub(REDACTED, _BEARER.sub(rf"\1 {REDACTED}", text))


def _clean(name: str, value: Any) -> Any:
    if _SECRET_FIELD.search(name):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.loads(redact(json.dumps(value, default=str)))
    return redact(str(value))


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller attached with `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class Redactor(logging.Filter):
    """Scrubs secrets from a record before any formatter sees it (message, arguments, extra fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):        # a bad format string: keep what there is, readable
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:   # formatters reuse exc_text
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        for name, value in extra_fields(record).items():
            setattr(record, name, _clean(name, value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        document: dict[str, Any] = {
            "time": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in extra_fields(record).items():
            document.setdefault(name, value)
        if record.exc_info or record.exc_text:
            document["exception"] = redact(record.exc_text or self.formatException(record.exc_info))
        return json.dumps(document, default=str, ensure_ascii=False)


def add_arguments(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """`--log-level` and `--log-format`; with `suppress` (on a subcommand) they default to the top-level values,
    so `park-broker --log-format json serve DIR` and `park-broker serve DIR --log-format json` both work."""
    parser.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS if suppress else "INFO",
                        help="least severe level logged (default INFO)")
    parser.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS if suppress else "text",
                        help="text lines, or one JSON object per line (default text)")


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """Route every logger to `stream` (stderr) in format `fmt`; replaces earlier handlers. Returns the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(Redactor())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler
