"""Fitting, calibrating and evaluating the VAE: data, fit, calibrate, evaluate, report.

Depends on detector/ (the model and bundle) and never on streams/ or Kafka."""
