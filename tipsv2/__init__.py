"""tipsv2: TIPSv2 models, objective, data and evaluation in pure PyTorch (no Ray, DeepSpeed, MLflow, vLLM)."""

__version__ = "0.1.0"
