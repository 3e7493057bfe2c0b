"""daguerre.pipeline: request schema, models, the diffusion engine, storage and the batch job."""
