"""finetune-advisor: the command-line entry point (`ftadvisor ...`, `python -m ftadvisor ...`)."""
