"""TCP and TLS pass-through: listeners whose connections are relayed byte for byte to a service's instances.

routes.py (pure) finds a connection's route, by the listener's port (`urlprefix-:PORT proto=tcp`) or by the
server name a TLS ClientHello carries (`urlprefix-NAME/ proto=tcp`); sni.py (pure) reads that name; relay.py
is one connection's life (connect, replay, relay both ways with flow control, account); listener.py holds a
listener's socket, its connections, their timeouts and its shutdown.
"""
