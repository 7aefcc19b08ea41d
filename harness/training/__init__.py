"""Training: pretraining and CPT / SFT uptraining, their recipes."""
