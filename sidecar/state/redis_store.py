"""Redis backend (redis-py asyncio): one store shared by every replica.

Server settings the guarantees rest on (check them when deploying; `fhir-sidecar check
--resolve` could read them with CONFIG GET where the ACL allows):

    maxmemory-policy noeviction   # an evicted reservation/receipt would let a retried write through;
                                  # with noeviction a full server refuses writes -> StateUnavailable -> 503
    appendonly yes                # receipts survive a restart ...
    appendfsync everysec          # ... losing at most ~1 s of them on a crash (`always`: none)
    Redis >= 6.2 (ACL users; scripts use effects replication, so TIME inside a script is safe)

ACL user for the sidecar (keys under the store prefix only, only the commands used; commands
called from scripts are checked too). Its password is a secret reference (`state.password`):

    ACL SETUSER fhir-sidecar on >PASSWORD resetkeys ~fhir-sidecar:* resetchannels -@all \
        +ping +get +set +del +eval +evalsha +script|load +hmget +hset +pexpire +time +select

and the store URL `redis://fhir-sidecar@redis.example:6379/0` (`rediss://` for TLS).
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from sidecar.state.base import StateUnavailable, check_bucket, check_key

T = TypeVar("T")

# Compare-and-set of a whole value. ARGV: has_expect, expect, has_new, new, px (0 = no expiry).
_CAS = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[3] == '1' then
  local px = tonumber(ARGV[5])
  if px > 0 then redis.call('SET', KEYS[1], ARGV[4], 'PX', px) else redis.call('SET', KEYS[1], ARGV[4]) end
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

# Token bucket on the server's clock (one clock for every replica). ARGV: rate, burst, cost.
# Floats go back as strings: Redis would truncate a Lua number reply to an integer.
_TAKE = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(v[1]), tonumber(v[2])
if tokens == nil or ts == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local ok, wait = 0, 0
if tokens >= cost then tokens = tokens - cost; ok = 1 else wait = (cost - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(((burst - tokens) / rate + 1) * 1000))
return {ok, tostring(wait)}
"""


def _px(ttl_s: float | None) -> int:
    return 0 if ttl_s is None else max(1, math.ceil(ttl_s * 1000))


class RedisStore:
    backend = "redis"

    def __init__(self, url: str, password: str | None = None, *, prefix: str = "fhir-sidecar:",
                 timeout_s: float = 1.0, retries: int = 1) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("a redis store URL starts with redis:// or rediss://")
        if parts.password is not None:
            raise ValueError("the redis URL must not carry a password: pass it from a secret reference")
        self.url = url
        self.prefix = prefix
        # Fail fast: a request waits at most ~(retries + 1) * timeout_s before StateUnavailable.
        # One retry rides over a pooled connection that died with a Redis restart; a replayed
        # SET NX / CAS is harmless (the callers recognise their own reservation).
        # from_url: the client owns its pool, so aclose() closes the connections too.
        self._r = aioredis.Redis.from_url(
            url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries), health_check_interval=30)
        self._cas = self._r.register_script(_CAS)
        self._take = self._r.register_script(_TAKE)

    def _k(self, key: str) -> str:
        check_key(key)
        return self.prefix + key

    async def _call(self, aw: Awaitable[T]) -> T:
        try:
            return await aw
        except (RedisError, OSError, TimeoutError) as e:
            # Includes OOM (noeviction, full), READONLY (failover), NOPERM (ACL): all fail closed.
            raise StateUnavailable(f"redis state store: {type(e).__name__}: {e}") from e

    async def get(self, key: str) -> bytes | None:
        v: Any = await self._call(self._r.get(self._k(key)))
        return None if v is None else bytes(v)

    async def cas(self, key: str, expect: bytes | None, new: bytes | None, ttl_s: float | None) -> bool:
        k = self._k(key)
        if expect is None and new is not None:
            # The common reservation: one `SET key val NX PX ttl`, no script.
            px = _px(ttl_s)
            res = await self._call(self._r.set(k, new, nx=True, px=px) if px else self._r.set(k, new, nx=True))
            return bool(res)
        args = ["1" if expect is not None else "0", expect or b"", "1" if new is not None else "0",
                new or b"", str(_px(ttl_s))]
        return bool(await self._call(self._cas(keys=[k], args=args)))

    async def take(self, key: str, rate: float, burst: float, cost: float = 1.0) -> tuple[bool, float]:
        check_bucket(rate, burst, cost)
        ok, wait = await self._call(self._take(keys=[self._k(key)], args=[repr(rate), repr(burst), repr(cost)]))
        return bool(int(ok)), float(wait)

    async def set_flag(self, name: str, value: str | None, ttl_s: float | None = None) -> None:
        k = self._k("flag:" + name)
        if value is None:
            await self._call(self._r.delete(k))
        else:
            px = _px(ttl_s)
            await self._call(self._r.set(k, value.encode(), px=px) if px else self._r.set(k, value.encode()))

    async def get_flag(self, name: str) -> str | None:
        v = await self.get("flag:" + name)
        return None if v is None else v.decode()

    async def ping(self) -> None:
        await self._call(self._r.ping())

    async def close(self) -> None:
        try:
            await self._r.aclose()
        except (RedisError, OSError):
            pass

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"
