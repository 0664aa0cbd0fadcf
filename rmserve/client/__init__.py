"""Client for an rmserve server; depends on httpx only."""
