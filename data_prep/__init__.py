"""Data preparation: synthetic and downloaded data sets for the distillation pipeline."""
