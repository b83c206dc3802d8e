"""The reference inference server: boots only from weights streamed by its gateway,
holds them in memory, and serves OpenAI-compatible completions under sampler spec v1
with token ids in every answer. See ``ivp.server.app`` and docs/ARCHITECTURE.md."""
