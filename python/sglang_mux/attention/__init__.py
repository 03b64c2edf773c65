"""The routed attention path: the `mux` attention backend and its torch reference."""
