"""Demo services and the `make demo` launcher (also used by the docker-compose stack)."""
