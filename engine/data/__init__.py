"""Training data: the on-disk image index, aspect-ratio buckets, the dataset and its batch sampler,
augmentations, and the latent and text-embedding caches."""
