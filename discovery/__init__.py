"""Service discovery: Consul (or a static file) in, immutable Snapshots out. Knows nothing of HTTP proxying."""
