"""Retries, in one place (STYLE.md item 5): an explicit list of retryable errors, jittered exponential backoff,
and the server's `Retry-After` honoured when it gives one.

Network backends call `call_with_retries` and switch off their client library's own retries, so that one
policy (and one log line per retry) governs every remote call.

Retryable HTTP statuses, and why:

    408 Request Timeout        the server gave up waiting for the request: transient
    429 Too Many Requests      rate limit: wait (Retry-After when sent) and try again
    500 Internal Server Error  often transient in inference servers (engine restart, worker hiccup)
    502 / 503 / 504            proxy, overload and gateway timeouts: transient by definition

Not retried: 409 (a conflict with server state says nothing about waiting; chat completions are stateless),
400/413/422 (the request itself is wrong: resending it cannot help), 401/403/404 (credentials, permission,
wrong URL or model: the caller decides whether that is fatal). Timeouts and connection errors are retryable;
the caller's `is_retryable` says which exceptions those are.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS: tuple[int, ...] = (408, 429, 500, 502, 503, 504)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to wait: attempt n (1-based) failing waits min(max_delay, base_delay * 2**(n-1)),
    drawn uniformly from [0, that] with full jitter, or the server's Retry-After capped at max_delay."""

    max_attempts: int = 6  # first try included: 6 = 1 try + 5 retries
    base_delay: float = 0.5  # seconds
    max_delay: float = 30.0  # seconds; also caps Retry-After
    jitter: bool = True  # full jitter (AWS architecture blog): spreads out clients that failed together

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"delays must be >= 0, got base_delay={self.base_delay} max_delay={self.max_delay}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) when the server said nothing."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 60))
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(0.0, ceiling)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """The wait before the next attempt: Retry-After (capped) when given, else jittered backoff."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        return self.backoff(attempt, rng)


def is_retryable_status(status: int | None) -> bool:
    return status in RETRYABLE_STATUS


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """A `Retry-After` header value -> seconds: delta-seconds ("2", "1.5") or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if parsed is None:
            return None
        seconds = parsed.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN or infinite: ignore
        return None
    return max(seconds, 0.0)


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_retryable: Callable[[BaseException], bool],
    retry_after: Callable[[BaseException], float | None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    describe: Callable[[BaseException], str] = lambda exc: type(exc).__name__,
    what: str = "call",
) -> T:
    """Run `fn` until it returns, fails with a non-retryable error, or `policy.max_attempts` are spent; the last
    error is re-raised. `describe` renders an error for the log line and must not reveal secrets."""
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - sorted by is_retryable; the rest re-raised unchanged
            if attempt >= policy.max_attempts or not is_retryable(exc):
                raise
            wait = policy.delay(attempt, retry_after(exc) if retry_after else None)
            log.warning("%s failed (%s); retry %d/%d in %.2fs", what, describe(exc), attempt,
                        policy.max_attempts - 1, wait)
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            sleep(wait)
            attempt += 1
