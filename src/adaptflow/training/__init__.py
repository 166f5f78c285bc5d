"""Training: source pretraining, the frozen-backbone baseline, fine-tuning strategies, the advisor."""
