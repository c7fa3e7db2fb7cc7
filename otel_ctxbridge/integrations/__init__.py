"""Optional integrations; each module needs its own extra and none is imported by the core.

- :mod:`otel_ctxbridge.integrations.db`: tenant-routed connection pools and transactions held in
  context (PostgreSQL through asyncpg, extra ``postgres``).
- :mod:`otel_ctxbridge.integrations.sqlite`: an asyncpg-shaped pool over ``aiosqlite`` for local
  runs and demos, usable with the same tenant pools and transactions.
"""
