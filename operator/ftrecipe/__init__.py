"""ftrecipe: fine-tune a Rasa CALM command-generator LLM, on Kubernetes or on one machine."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ftrecipe")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
