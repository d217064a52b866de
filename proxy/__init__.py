"""The HTTP side: routing table, pools and balancers, dispatch, exchange, HTTP/1.1 connections, metrics, admin,
CLI. Reads Snapshots; never talks to Consul."""

# First of all: whether the hot path's modules load compiled or from source (proxy/compiled.py).
from .compiled import BUILD as BUILD

__version__ = "0.1.0"
