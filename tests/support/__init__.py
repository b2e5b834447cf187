"""Test peers and harness code shared by tests and benchmarks: free loopback ports (ports.py), private
Postfix instances, smtp-sink and smtp-source (postfix.py) with their pytest fixtures (fixtures.py), and
the real `backupmx serve` as a subprocess (serve.py). Nothing here touches the system's own Postfix."""
