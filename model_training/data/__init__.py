"""Data: sources and their labels, manifests, patient-level splits, checks, augmentation, sampling, lung crops."""
