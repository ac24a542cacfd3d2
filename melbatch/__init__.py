"""melbatch: classify large audio archives by looking at their log-mel spectrograms, on Ray."""

__version__ = "0.1.0"
