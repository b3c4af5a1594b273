"""The model lifecycle around the worker core: hot reload of a new bundle, shadow scoring,
drift of the score distribution. It plugs into the core through `streams.worker.loop.ModelSwaps`."""
