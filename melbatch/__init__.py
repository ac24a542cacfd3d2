"""melbatch: classify large audio archives by looking at their log-mel spectrograms, on Ray."""

__version__ = "0.1.0"

# A storage location: s3://bucket/key, a local path, file://..., memory://... (melbatch.storage reads them all)
URI = str
