"""Model families and their files: loading a base model (diffusers folder or single file), prompt
encoding, the shipped architecture configs, the original single-file key maps, conversion, textual-inversion
embeddings and the tiny offline demo model."""
