"""Serving: autoregressive generation with the global KV cache, the ``generate`` command, and serving speed
of routed networks against their teacher."""
