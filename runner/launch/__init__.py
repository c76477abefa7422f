"""Launch: multi-process engines (torchrun / accelerate with FSDP or DeepSpeed) and the export bundle for clusters."""
