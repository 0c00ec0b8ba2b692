"""Rebuild: replay the whole log into a fresh generation, then swap it in atomically.

Where the log comes from. The outcomes service may not read other services' databases, and it
does not need to: every service stream in JetStream keeps every message (limits retention, no
age limit; see ``shared.broker.ensure_streams``), so the broker is the shared record of
everything published. The rebuild reads each source stream from sequence 1 — the same
messages, in the same stream order, that the live consumers read — through the same code
(:mod:`services.outcomes.projector`), which is what makes a rebuilt projection equal the live one.

The parts:

- :mod:`.job` — one rebuild from start to swap, and its progress;
- :mod:`.reader` — the JetStream replay puller;
- :mod:`.lease` — the one-rebuild-at-a-time lease (rules);
- :mod:`.wiring` — the entry points: ``rebuild(nats_url, database_url, streams)`` (the CLI and
  the benchmarks) and ``BackgroundRebuild`` (the admin endpoint, inside the service).

Its steps (claim, checkpoint, timeline write, swap, release, clean-up) are use cases in
:mod:`services.outcomes.handlers`.
"""
