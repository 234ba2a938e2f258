"""Frozen-feature evaluation: zero-shot classification and segmentation, image-text retrieval, linear
probes (segmentation, depth), kNN classification, dataset adapters and named suites.

Modules: metrics (mIoU, recall@k, RMSE), features (extraction from a model or any callable), zero_shot,
retrieval, probes, datasets (pyarrow-filesystem adapters), suites (`run_suite(name, model, tokenizer, location)`).
"""
