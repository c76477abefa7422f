"""Training: the recipe (setup -> train -> cleanup), its data path, callbacks, model resolution, the worker process."""
