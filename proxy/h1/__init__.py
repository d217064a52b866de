"""HTTP/1.1 on asyncio protocols with llhttp: the client side (`client`, `reader`, `head`) and the upstream
side (`upstream`: keep-alive connections to instances and their pool)."""
