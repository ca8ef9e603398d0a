"""A front-end process: terminates HTTP and WebSocket, validates and parses, encodes answers, and talks to
the engine core (``client.py``) over ``service/ipc.py``. No model work and no session state here: any
front end can serve any session."""
