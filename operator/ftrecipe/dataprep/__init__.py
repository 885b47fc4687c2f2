"""Data preparation: E2E tests in, fine-tuning records out (parsing, commands, prompts, splits)."""
