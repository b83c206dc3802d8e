"""ivp: inference-only verification package."""
