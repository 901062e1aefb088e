"""Live migration by tokens: the source and destination sides of the protocol."""
