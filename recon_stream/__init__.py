"""recon-stream: outside-in attack-surface monitoring from endpoint-agent heartbeats."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recon-stream")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
