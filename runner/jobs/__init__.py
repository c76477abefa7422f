"""Jobs: the job manager, registry, supervisor, failure classifier, rank sweeps and the typed run-folder files."""
