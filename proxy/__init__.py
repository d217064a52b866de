"""The HTTP side: routing table, pools and balancers, dispatch, exchange, HTTP/1.1 connections, metrics, admin,
CLI. Reads Snapshots; never talks to Consul."""

__version__ = "0.1.0"
