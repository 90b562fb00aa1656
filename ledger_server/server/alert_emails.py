"""Queues the email of a low-balance alert that a charge has just raised. Best effort:
if Redis is unreachable the alert stays pending in PostgreSQL and the sweeper queues
its email later, so no alert is lost with Redis."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from workers.queues import DEFAULT_QUEUE, enqueue, redis_connection

log = logging.getLogger(__name__)

SEND_JOB = "workers.alerts.send_low_balance_email"


class AlertEmails:
    def __init__(self, redis_url: str) -> None:
        self._connection = redis_connection(redis_url) if redis_url else None

    async def queue_for(self, account_id: str, data: dict[str, Any]) -> None:
        alert_id = data.get("low_balance_alert_id")
        if alert_id is None or data.get("replayed") or self._connection is None:
            return
        try:
            await asyncio.to_thread(
                enqueue,
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
