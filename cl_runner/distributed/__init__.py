"""torch.distributed / SLURM environment and FSDP2 sharding."""
