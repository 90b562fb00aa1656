"""Queues the email of a low-balance alert that a charge has just raised. Best effort, in
the background: the alert is already stored in PostgreSQL as pending, and the sweeper
(workers/sweepers.py: requeue_pending_alert_emails) queues any pending alert whose job is
missing once it is a minute old, so the call that raised it answers without waiting on
Redis. A Redis that hangs held every crossing charge (Commit, Consume, AdjustBalance) for
the Redis time-out, queued behind one another on the event loop's default executor: a
client's deadline passed on a charge PostgreSQL had committed.

The enqueue runs on this module's own few threads, with a Redis client of its own whose
time-out is short; enqueues beyond MAX_WAITING are left to the sweeper."""

from __future__ import annotations

import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from workers.queues import DEFAULT_QUEUE, enqueue

log = logging.getLogger(__name__)

SEND_JOB = "workers.alerts.send_low_balance_email"

# Enqueues in flight at once per server. Two threads: an enqueue takes a millisecond with
# Redis up; with it down each waits QUEUE_TIMEOUT_SECONDS, and more threads would only
# multiply the connections a struggling Redis is offered.
QUEUE_THREADS = 2
# How long one enqueue may wait on Redis (to connect, then for each reply). REDIS_URL's own
# socket_timeout/socket_connect_timeout take precedence, as for every client of it.
QUEUE_TIMEOUT_SECONDS = 1.0
# Enqueues waiting for a thread beyond which a new one is not queued (the sweeper queues
# its email): a Redis outage under a burst of crossings must not build an endless backlog.
MAX_WAITING = 200


class AlertEmails:
    def __init__(self, redis_url: str) -> None:
        self._connection = (
            Redis.from_url(
                redis_url,
                socket_timeout=QUEUE_TIMEOUT_SECONDS,
                socket_connect_timeout=QUEUE_TIMEOUT_SECONDS,
            )
            if redis_url
            else None
        )
        self._threads = ThreadPoolExecutor(QUEUE_THREADS, thread_name_prefix="alert-email")
        self._lock = threading.Lock()
        self._waiting = 0

    def close(self) -> None:
        """Drops the enqueues not yet started: their alerts are pending, for the sweeper."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._connection is not None:
            self._connection.close()

    def queue_for(self, account_id: str, data: dict[str, Any]) -> None:
        """Starts queueing the email of the alert `data` raised, if any; returns at once."""
        alert_id = data.get("low_balance_alert_id")
        if alert_id is None or data.get("replayed") or self._connection is None:
            return
        with self._lock:
            if self._waiting >= MAX_WAITING:
                log.warning(
                    "alert %s: email not queued (%d waiting for Redis); the sweeper will queue it",
                    alert_id,
                    self._waiting,
                )
                return
            self._waiting += 1
        # The call's context: the job carries its request id (workers.queues.enqueue).
        context = contextvars.copy_context()
        try:
            self._threads.submit(context.run, self._enqueue, account_id, alert_id)
        except RuntimeError:  # shut down: the server is stopping
            with self._lock:
                self._waiting -= 1

    def _enqueue(self, account_id: str, alert_id: int) -> None:
        try:
            enqueue(
                DEFAULT_QUEUE,
                SEND_JOB,
                account_id,
                alert_id,
                job_id=f"alert-email-{alert_id}",
                connection=self._connection,
            )
        except (RedisError, OSError) as error:
            log.warning(
                "alert %s: email not queued (%s); the sweeper will queue it", alert_id, error
            )
        except Exception:  # nobody awaits this: a bug must show in the log
            log.exception("alert %s: email not queued; the sweeper will queue it", alert_id)
        finally:
            with self._lock:
                self._waiting -= 1
