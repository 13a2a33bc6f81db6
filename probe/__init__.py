"""Reachability and censorship measurement agent for messenger signalling and call relays."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("messenger-reachability-probe")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
