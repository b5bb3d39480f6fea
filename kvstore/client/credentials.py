"""A user's credentials and the token they buy: attached to every call, renewed when refused.

The client authenticates before its first call (a call without a token could
be taken for the user its client certificate names, see --client-cert-auth);
a cluster with auth disabled answers that there is nothing to authenticate
for, and calls then go without a token. Whenever a member answers
UNAUTHENTICATED (auth was enabled since, the token expired, or an auth change
made it stale) the client authenticates again and retries the call.
Concurrent refusals share one Authenticate.
Session streams carry the token they were opened with (gRPC metadata is sent
once per stream), so a new token also means new streams (``generation``).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["Credentials", "TOKEN_METADATA_KEY"]

TOKEN_METADATA_KEY = "token"


class Credentials:
    def __init__(self, user: str, password: str) -> None:
        if not user:
            raise ValueError("user name is empty")
        self.user = user
        self.password = password
        self.token: str | None = None
        #: gRPC call metadata carrying the token (None until the first Authenticate).
        self.metadata: tuple[tuple[str, str], ...] | None = None
        #: One more for every new token.
        self.generation = 0
        self._lock: asyncio.Lock | None = None

    async def renew(self, seen_generation: int,
                    authenticate: Callable[[str, str], Awaitable[str | None]]) -> None:
        """Get a new token (None: auth is disabled), unless another call already did since ``seen_generation``."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.generation != seen_generation:
                return
            token = await authenticate(self.user, self.password)
            self.token = token
            self.metadata = None if token is None else ((TOKEN_METADATA_KEY, token),)
            self.generation += 1
