"""What "ready" means for ``purifier serve``, in one place: the model is loaded and a
warm-up batch has run, the server is not draining, and the downstream (when there is
one) has not been unreachable for longer than ``unready_after_s``.

The downstream is probed every ``interval_s`` (``Downstream.probe``: one ServerReady call;
an error or ``ready: false`` counts as down). A short outage within ``unready_after_s``
leaves readiness alone (a blip should not pull every replica out of a load balancer);
a longer one makes the server NOT_SERVING until the first probe that succeeds again.
``unready_after_s`` 0 turns the downstream check off.

The probe results arrive through ``downstream(ok, now)``, so a test can drive the state
with its own clock; ``watch`` is the loop a server runs, and ``on_change(ready)`` is told
of every flip (the server sets gRPC health there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from . import logs

log = logging.getLogger("purifier.readiness")


class Readiness:
    def __init__(self, unready_after_s: float, on_change: Callable[[bool], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.unready_after_s = unready_after_s
        self.on_change = on_change
        self.clock = clock
        self.warm = False             # weights loaded, warm-up batch run
        self.draining = False         # SIGTERM (or stop) seen
        self.down_since: float | None = None   # first failed probe of the current outage
        self._reported: bool | None = None

    @property
    def model_ready(self) -> bool:
        """Model ``purifier`` can purify: loaded, warm, not draining (the downstream does not matter)."""
        return self.warm and not self.draining

    @property
    def downstream_ok(self) -> bool:
        if not self.unready_after_s or self.down_since is None:
            return True
        return self.clock() - self.down_since < self.unready_after_s

    @property
    def ready(self) -> bool:
        """The server as a whole: health SERVING, ServerReady true."""
        return self.model_ready and self.downstream_ok

    async def downstream(self, ok: bool, now: float | None = None) -> None:
        """Record one probe result (``now``: its time.monotonic(); default the clock)."""
        now = self.clock() if now is None else now
        if ok:
            if self.down_since is not None:
                logs.log(log, logging.INFO, "downstream reachable again", down_s=round(now - self.down_since, 3))
            self.down_since = None
        elif self.down_since is None:
            self.down_since = now
            logs.log(log, logging.WARNING, "downstream unreachable", unready_after_s=self.unready_after_s)
        await self.changed()

    async def changed(self) -> None:
        """Tell ``on_change`` if ``ready`` differs from what it was last told."""
        ready = self.ready
        if ready != self._reported:
            self._reported = ready
            if self.on_change is not None:
                await self.on_change(ready)

    async def watch(self, probe: Callable[[float], Awaitable[bool]], interval_s: float) -> None:
        """Probe every ``interval_s`` until cancelled; each probe may take at most that long."""
        while True:
            started = self.clock()
            try:
                ok = await probe(interval_s)
            except Exception:  # noqa: BLE001 - a probe that breaks must not end readiness checks
                log.exception("downstream probe failed")
                ok = False
            await self.downstream(ok)
            await asyncio.sleep(max(0.0, interval_s - (self.clock() - started)))
