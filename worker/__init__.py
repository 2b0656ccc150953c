"""genq worker: everything that runs next to the model."""
