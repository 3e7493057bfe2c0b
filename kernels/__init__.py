"""daguerre.kernels: attention backends and UNet compilation (see README)."""
