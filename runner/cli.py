"""Sub-commands of this package (placeholder until implemented)."""


def register(subparsers) -> None:
    """Add this package's commands to the `ftadvisor` parser."""
