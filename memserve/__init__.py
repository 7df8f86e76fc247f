"""memserve: an inference server for memory-augmented sequence models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memserve")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
