"""Training data: the embedded procedural shapes dataset (`diffusers_microdit.data.shapes`)."""
