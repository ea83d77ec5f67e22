"""The pipeline's stages: teacher -> generators (or DAFL's joint loop) -> distill."""
