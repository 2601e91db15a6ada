"""Networks: the architecture registry (create_model), ImageNet and exported weights, the lung segmenter."""
