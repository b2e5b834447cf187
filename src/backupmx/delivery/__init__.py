"""Delivery to the primaries: routes (route.py: configured primary or better-ranked MX, never
ourselves), the SMTP relay client (relay.py), the retry schedule (backoff.py), retention with outage
pauses (retention.py), DSNs (bounce.py) and the engine (scheduler.py,
composing claiming, work, connections, attempt, outcomes, notices, outages, sweep, leases, statistics)."""
