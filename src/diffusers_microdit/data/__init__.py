"""The embedded procedural shapes dataset (`diffusers_microdit.data.shapes`) and its scorer (`.shapes_eval`)."""
