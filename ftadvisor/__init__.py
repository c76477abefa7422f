"""finetune-advisor: command-line entry point and shared error types."""
