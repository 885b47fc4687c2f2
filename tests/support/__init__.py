"""Test fixtures that start the real components ftrecipe talks to (S3, LLM, Kubernetes API, models, helm)."""
