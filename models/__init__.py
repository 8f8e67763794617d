"""Model definitions in pure PyTorch (no Prefect, MLflow or file-system code): `models.gpt` is the decoder."""
