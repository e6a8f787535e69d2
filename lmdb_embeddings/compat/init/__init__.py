"""The CoSiR initialisations: from a FeatureManager's features (``cosir_init``), by streamed PCA (``pca``)."""
