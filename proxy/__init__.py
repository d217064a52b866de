"""The HTTP side: routing table, pools and balancers, forwarder, server, metrics, admin, CLI. Reads Snapshots."""

__version__ = "0.1.0"
