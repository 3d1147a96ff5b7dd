"""Failed authentications counted per client address, to refuse one that guesses."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable


class FailureLimiter:
    """Counts failed authentications per client address in fixed windows of `window` seconds;
    past `limit` in one window, the address is refused until the window ends.

    At most `max_clients` addresses are tracked: a flood of new addresses evicts the oldest
    windows, so memory stays bounded whatever the traffic.
    """

    def __init__(
        self,
        limit: int = 20,
        window: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        # address -> [window start, failures in it]
        self._clients: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it may now."""
        entry = self._clients.get(client)
        if entry is None:
            return None
        left = entry[0] + self.window - self._clock()
        if left <= 0:
            del self._clients[client]
            return None
        return math.ceil(left) if entry[1] > self.limit else None

    def failed(self, client: str) -> None:
        now = self._clock()
        entry = self._clients.get(client)
        if entry is None or now - entry[0] >= self.window:
            self._clients.pop(client, None)
            self._clients[client] = [now, 1]
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            entry[1] += 1
