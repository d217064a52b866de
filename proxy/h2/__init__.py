"""HTTP/2 to clients: a connection protocol driving the sans-IO `h2` state machine, one Downstream per stream."""
