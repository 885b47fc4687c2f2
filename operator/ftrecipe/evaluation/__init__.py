"""`ftrecipe evaluate`: score a command generator (base + adapter, or any OpenAI-compatible endpoint) on val.jsonl.

``scoring`` and ``report`` are pure; ``generate`` (transformers) and ``endpoint`` (openai) produce the
answers, ``progress`` reports them as JSON lines; ``references`` reads the validation split; ``run`` wires
them and publishes the report bundle.
"""
