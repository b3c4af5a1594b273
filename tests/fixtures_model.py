"""Fixtures that give real Fashion-MNIST and a small trained bundle (owned by the trainer work)."""
