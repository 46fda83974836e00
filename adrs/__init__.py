"""The harness: config, LLM client, prompts, mutation, parent selection, the loop, the archive, review, CLI."""
