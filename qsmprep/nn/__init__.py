"""Deep-learning QSM: the adaptive U-Net model, its weights and tiled inference (torch)."""
