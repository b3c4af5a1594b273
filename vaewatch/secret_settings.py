"""Secret settings (SecretStr fields) stay secret: masked in `vaewatch config` and in every log
line, whoever writes it (kafka-python's admin client logs its whole configuration at DEBUG)."""

from __future__ import annotations

import logging

from pydantic import SecretBytes, SecretStr

from vaewatch.config import Settings, secret_keys

MASK = "**********"  # what pydantic shows for a SecretStr


def secret_values(settings: Settings) -> list[str]:
    """The non-empty values of the secret settings, longest first (so no prefix is masked first
    and leaves the rest of a longer secret readable)."""
    values = []
    for dotted in secret_keys():
        section, name = dotted.split(".")
        secret = getattr(getattr(settings, section), name)
        if isinstance(secret, SecretStr):
            values.append(secret.get_secret_value())
        elif isinstance(secret, SecretBytes):
            values.append(secret.get_secret_value().decode("utf-8", "replace"))
    return sorted((v for v in values if v), key=len, reverse=True)


class SecretMaskingFilter(logging.Filter):
    """Replaces every secret value in a record's message (and traceback) with MASK."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = secrets

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: the handler reports it, as it would without us
            return True
        masked = self._mask(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._mask(record.exc_text)
        return True


def mask_secrets_in_logs(settings: Settings, logger: logging.Logger | None = None) -> None:
    """Attach the masking filter to every handler of `logger` (default: the root logger), where
    records from all loggers pass."""
    logger = logger if logger is not None else logging.getLogger()
    masking = SecretMaskingFilter(secret_values(settings))
    for handler in logger.handlers:
        for old in [f for f in handler.filters if isinstance(f, SecretMaskingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(masking)
